"""Benchmark the toy checkpoints of the built-in default.

Prints the toy vision tower's pretraining (steps, seconds, held-out accuracy per target)
and, for the toy teacher and the toy student base: parameter count, held-out test
accuracy per skill, evaluated with exactly the default config's eval settings (the
``mmdc eval`` path), and build time; then how well the teacher writes new instances
(parsed; well-posed with the right label, judged on the hidden scenes). By default it
measures the shipped checkpoints and reads build times from the manifests written when
they were built; ``--rebuild`` builds everything cold into a temporary folder first and
times that build.

    python benchmarks/toy_models.py [--rebuild] [--data-root DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmdc.config import load_config
from mmdc.data.load import load_split
from mmdc.evaluation import evaluate
from mmdc.models.load import TOY_DIR, count_parameters, load_model, vocab_report
from mmdc.toy.build import MANIFEST, VISION, build_toy
from mmdc.toy.diagnostics import writing_check
from mmdc.toy.task import prepare_data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="cold-build both into a temp dir")
    ap.add_argument("--data-root", default="data/synthetic",
                    help="the synthetic task's folder (written with `mmdc data synth` "
                    "when missing)")
    ap.add_argument("--json", default=None, help="also write the table as JSON")
    args = ap.parse_args()
    torch.set_num_threads(2)

    folder = TOY_DIR
    tmp = None
    total_build = None
    if args.rebuild:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
        start = time.time()
        build_toy(folder, force=True)
        total_build = time.time() - start

    cfg = load_config(None, [f"data.root={args.data_root}"])

    prepare_data(cfg.data)
    split = load_split(cfg.data, cfg.data.test_split)
    ev = cfg.eval
    vision = json.loads((folder / VISION / MANIFEST).read_text())
    pre = vision["pretraining"]
    print(f"Toy vision tower: {vision['parameters']:,} parameters, {pre['steps']} steps, "
          f"{pre['seconds']:.0f}s, held-out accuracy per target: "
          + ", ".join(f"{k} {v:.3f}" for k, v in pre["heldout_acc"].items()) + "\n")
    rows = {}
    for role in ("teacher", "student"):
        manifest = json.loads((folder / role / MANIFEST).read_text())
        loaded = load_model(str(folder / role), device="cpu")
        start = time.time()
        res = evaluate(loaded, split, fmt=ev.prompt, batch_size=ev.batch_size,
                       max_new_tokens=ev.max_new_tokens, limit=ev.limit, desc=f"eval {role}")
        total = count_parameters(loaded.model)
        rows[role] = {
            "parameters": total,
            # the language model with its head: all but the tower and the projector
            "lm_parameters": total - count_parameters(loaded.model.model.vision_tower)
            - count_parameters(loaded.model.model.multi_modal_projector),
            "test_acc": round(res.accuracy, 2),
            "skills": {k: round(v["acc"], 1) for k, v in res.skills.items()},
            "build_s": manifest["build_seconds"],
            "eval_s": round(time.time() - start, 1),
        }
    teacher = load_model(str(folder / "teacher"), device="cpu")
    writing = writing_check(teacher.model, teacher.processor,
                            max_new_tokens=cfg.generate.max_new_tokens)
    vocab = vocab_report(str(folder / "teacher"), str(folder / "student"))
    skills = list(rows["teacher"]["skills"])
    print(f"Toy checkpoints ({'cold rebuild' if args.rebuild else 'shipped'}), held-out "
          f"synthetic test ({len(split.instances)} items), {ev.prompt}, "
          f"max_new_tokens={ev.max_new_tokens}:\n")
    print("| model | parameters | language model | test acc | build s | " + " | ".join(skills)
          + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(skills))
    for role, r in rows.items():
        print(f"| {role} | {r['parameters']:,} | {r['lm_parameters']:,} | {r['test_acc']:.2f} | "
              f"{r['build_s']:.0f} | "
              + " | ".join(f"{r['skills'][s]:.1f}" for s in skills) + " |")
    ratio = rows["teacher"]["parameters"] / rows["student"]["parameters"]
    lm_ratio = rows["teacher"]["lm_parameters"] / rows["student"]["lm_parameters"]
    print(f"\nteacher/student parameters: {ratio:.1f}x in all, {lm_ratio:.1f}x in the "
          "language model")
    print(f"shared vocabulary: {vocab['shared_vocabulary']}")
    w = writing
    print(f"teacher writing: {w['parsed']}/{w['asked']} new instances parse; of those "
          f"{w['correct']} well-posed with the right label, {w['wrong']} wrong label, "
          f"{w['ill_posed']} ill-posed, {w['off_template']} off-template")
    if total_build is not None:
        print(f"cold build of both (wall): {total_build:.0f}s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak_mb:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "vocab": vocab,
                                               "writing": writing, "vision": vision,
                                               "cold_build_s": total_build}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
