"""What does one imitation step cost the student on the skills it already knows?

Replays iteration 1's imitation step of a finished run (its aligned student adapter, the
seed split and the instances accepted in iteration 1, with the teacher's answers the run
cached) under variants of the imitation settings, and prints the student's probe-split
(val) accuracy per skill after each: the run's own step, and the aligned student before
it. The held-out test is not read.

    python docs/experiments/probes/imitation_forgetting.py runs/e5 \
        --variant base --variant lr3e-4:imitate.train.learning_rate=3e-4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def probe_skills(cfg, adapter: str | None, probe) -> tuple[float, dict]:
    from mmdc.roles import evaluate_on, student_model

    res = evaluate_on(cfg, student_model(cfg, adapter), probe, "eval student (val)")
    return res.columns["Avg"]["acc"], {k: v["acc"] for k, v in res.skills.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME[:key=value,key=value] imitation overrides; 'skip=SKILL' drops "
                         "the generated instances of a skill, 'gold=1' gives the seed split "
                         "its own labels, 'start=none' trains a fresh adapter, 'balance=1' repeats the "
                         "'freeze=NAME' trains with parameters whose name holds NAME frozen, "
                         "'projector=0' (with start=none) leaves the projector untrained, "
                         "seed split's rows of each skill up to the commonest skill's count")
    args = ap.parse_args()
    from mmdc import training
    from mmdc.config import load_config
    from mmdc.data.load import load_split
    from mmdc.data.pool import read_jsonl, read_pool
    from mmdc.roles import train_role
    from mmdc.stages.imitate import imitation_rows, imitation_targets

    run = args.run
    base_cfg = load_config(run / "config.yaml", [])
    seed = load_split(base_cfg.data, base_cfg.data.seed_split)
    probe = load_split(base_cfg.data, base_cfg.data.probe_split)
    generated = read_pool(run / "iter_1" / "generated_accepted.jsonl")
    answers = read_jsonl(run / "iter_1" / "teacher_answers.jsonl")
    aligned = str(run / "align" / "student" / "adapter")
    results = [("aligned (before imitation)", 0, *probe_skills(base_cfg, aligned, probe))]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.variant or ["base"]:
            name, _, rest = spec.partition(":")
            overrides = [o for o in rest.split(",") if o]
            ours = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides
                    if o.split("=", 1)[0] in ("skip", "gold", "start", "balance", "projector", "freeze")}
            skip = {o.split("=", 1)[1] for o in overrides if o.startswith("skip=")}
            cfg = load_config(run / "config.yaml",
                              [o for o in overrides if o.split("=", 1)[0] not in ours])
            gen = [i for i in generated if i.skill not in skip]
            pool = list(seed.instances) + gen
            images = [seed.image(i) for i in seed.instances] + [
                seed.image(i) for i in gen]
            given = answers
            if ours.get("gold") == "1":
                gold = {i.id: i.answer for i in seed.instances}
                given = [dict(a, choice=gold[a["id"]]) if a["id"] in gold else a
                         for a in answers]
            rows, _ = imitation_rows(pool, given, images, cfg.imitate.formats,
                                     {i.id for i in gen}, cfg.imitate.generated_weight)
            if ours.get("balance") == "1":  # each skill's seed rows as many as the commonest's
                from collections import Counter

                seen = Counter(i.skill for i in seed.instances)
                most = max(seen.values())
                kept, _, _ = imitation_targets(pool, given)
                extra = {i.id for i in seed.instances}
                again = [r for i, r in zip(kept, rows) if i.id in extra
                         for _ in range(-(-most // seen[i.skill]) - 1)]
                rows = rows + again
            saved = training.PROJECTOR_MODULES
            if ours.get("projector") == "0":  # a fresh adapter that leaves the projector be
                training.PROJECTOR_MODULES = None
            train_sft = training.train_sft
            if ours.get("freeze"):  # train with these modules (by name) frozen
                def frozen(model, *a, _part=ours["freeze"], _train=train_sft, **kw):
                    for n, p in model.named_parameters():
                        if _part in n:
                            p.requires_grad_(False)
                    return _train(model, *a, **kw)

                training.train_sft = frozen
            start = time.time()
            out = Path(tmp) / name
            train_role(cfg, cfg.student, rows,
                       None if ours.get("start") == "none" else aligned, out / "adapter", out / "logs",
                       cfg.imitate.train, label=f"imitate {name}")
            training.PROJECTOR_MODULES, training.train_sft = saved, train_sft
            avg, skills = probe_skills(cfg, str(out / "adapter"), probe)
            results.append((name, round(time.time() - start), avg, skills))
    names = list(results[0][3])
    print(f"Student on the probe split (val, CQM-A %) after iteration 1's imitation step of "
          f"{run}, replayed from its aligned adapter\n")
    print("| variant | s | " + " | ".join(names) + " | avg |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    for name, secs, avg, skills in results:
        print(f"| {name} | {secs} | " + " | ".join(f"{skills[k]:.0f}" for k in names)
              + f" | {avg:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
