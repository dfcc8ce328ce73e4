"""How much of one skill can the student's LoRA imitation learn from N instances with
every label right? The ceiling of what calibration can give that skill.

The loop can only teach the student what one imitation step (``imitate.train``, LoRA on
``align.lora``) learns from the instances the teacher writes and verifies. This runs that
step with an oracle teacher on the built-in task: the seed split with its gold letters,
plus N new instances of one skill drawn from the task's world (labels exact, images
drawn from their hidden scenes), each repeated ``--weight`` times as the loop repeats
generated instances. The student starts from a fresh adapter on the base student, as
the loop's alignment does. Prints the held-out test accuracy per skill for each N.

    python docs/experiments/probes/imitation_ceiling.py --skill spatial --n 0 40 300 1000 --weight 8 8 1 1
    python docs/experiments/probes/imitation_ceiling.py --skill spatial --n 1000 --weight 1 align.lora.r=64
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path


def ceiling(cfg, seed_split, test, skill: str, n: int, weight: int, work: Path) -> dict:
    from mmdc.roles import evaluate_on, student_model, train_role
    from mmdc.toy import world
    from mmdc.training import sft_rows

    rng = random.Random(f"imitation-ceiling-{skill}-{cfg.seed}")
    new = [world.make_instance(skill, rng, f"oracle-{skill}-{i}", "oracle") for i in range(n)]
    rows = []
    for fmt in cfg.imitate.formats:
        rows += sft_rows(seed_split.instances,
                         [seed_split.image(i) for i in seed_split.instances], fmt)
        rows += sft_rows(new, [world.draw_scene(i.meta["scene"]) for i in new], fmt) * weight
    start = time.time()
    out = work / f"{skill}-{n}-{weight}"
    losses = train_role(cfg, cfg.student, rows, None, out / "adapter", out / "logs",
                        cfg.imitate.train, label=f"imitate {n} x {weight}")
    res = evaluate_on(cfg, student_model(cfg, str(out / "adapter")), test, "eval student")
    return {"n": n, "weight": weight, "rows": len(rows), "train_s": round(time.time() - start),
            "loss": (losses[0], losses[-1]) if losses else None,
            "avg": res.columns["Avg"]["acc"],
            "skills": {k: v["acc"] for k, v in res.skills.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skill", default="spatial")
    ap.add_argument("--n", type=int, nargs="+", default=[0, 40, 300, 1000])
    ap.add_argument("--weight", type=int, nargs="+", default=None,
                    help="repeats of the new instances, one per --n (default: the config's "
                         "imitate.generated_weight for every N)")
    ap.add_argument("override", nargs="*", help="key=value config overrides")
    argv = sys.argv[1:]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = ap.parse_args([a for a in argv if a not in overrides])
    from mmdc.config import load_config
    from mmdc.toy import world

    cfg = load_config(None, overrides)
    if args.skill not in world.SKILLS:
        ap.error(f"--skill: one of {', '.join(world.SKILLS)}")
    weights = args.weight or [cfg.imitate.generated_weight] * len(args.n)
    if len(weights) != len(args.n):
        ap.error("--weight: one value per --n")
    from mmdc.data.load import load_split
    from mmdc.toy.task import prepare_data

    prepare_data(cfg.data)
    seed_split = load_split(cfg.data, cfg.data.seed_split)
    test = load_split(cfg.data, cfg.data.test_split)
    with tempfile.TemporaryDirectory() as tmp:
        results = [ceiling(cfg, seed_split, test, args.skill, n, w, Path(tmp))
                   for n, w in zip(args.n, weights, strict=True)]
    skills = list(results[0]["skills"])
    print(f"Student after one imitation step ({cfg.imitate.train.max_steps} steps, lr "
          f"{cfg.imitate.train.learning_rate:g}, LoRA r {cfg.align.lora.r}) on the seed split "
          f"plus N {args.skill} instances with exact labels, held-out test, CQM-A (%)\n")
    print("| N | repeats | rows | loss first -> last | train s | "
          + " | ".join(skills) + " | avg |")
    print("|---:|---:|---:|---|---:|" + "---:|" * (len(skills) + 1))
    for r in results:
        loss = f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f}" if r["loss"] else ""
        print(f"| {r['n']} | {r['weight']} | {r['rows']} | {loss} | {r['train_s']} | "
              + " | ".join(f"{r['skills'][k]:.0f}" for k in skills) + f" | {r['avg']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
