"""Benchmark the toy checkpoints of the built-in default.

Prints, for the toy teacher and the toy student base: parameter count, held-out test
accuracy (CQM-A, per skill too) and build time. By default it measures the shipped
checkpoints and reads their build time from the manifest written when they were built;
``--rebuild`` builds both cold into a temporary folder first and times that build.

    python benchmarks/toy_models.py [--rebuild] [--json OUT.json]
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
from mmdc.models.build import MANIFEST, build_toy
from mmdc.models.load import TOY_DIR, count_parameters, load_model, vocab_report


def write_requests(seeds: list) -> list:
    """Ask for a new instance like each seed, about a fresh image of the seed's skill."""
    import random

    from mmdc.data import synthetic
    from mmdc.generation import Request
    from mmdc.prompts import build_write_prompt

    rng = random.Random(0)
    reqs = []
    for seed in seeds:
        image = None
        if seed.image is not None:
            image = synthetic.draw_scene(synthetic.scene_for_skill(seed.skill, rng))
        reqs.append(Request(build_write_prompt(seed, "same"), image))
    return reqs


def teacher_writing(folder: Path, split, n: int = 64) -> dict:
    """How often the teacher's written instances parse into valid records."""
    from mmdc.generation import generate
    from mmdc.prompts import parse_written

    loaded = load_model(str(folder), device="cpu")
    seeds = split.instances[:n]
    outs = generate(loaded.model, loaded.processor, write_requests(seeds), max_new_tokens=96,
                    batch_size=32,
                    desc="teacher writes")
    parsed = same = 0
    for seed, out in zip(seeds, outs):
        try:
            fields = parse_written(out)
        except ValueError:
            continue
        parsed += 1
        same += fields["question"].split()[:3] == seed.question.split()[:3]
    return {"asked": len(seeds), "parsed": parsed, "same_template": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="cold-build both into a temp dir")
    ap.add_argument("--data-root", default="data/synthetic")
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
    split = load_split(cfg.data, cfg.data.test_split)
    rows = {}
    for role in ("teacher", "student"):
        manifest = json.loads((folder / role / MANIFEST).read_text())
        loaded = load_model(str(folder / role), device="cpu")
        start = time.time()
        res = evaluate(loaded, split, fmt="CQM-A", batch_size=64,
                       max_new_tokens=4, desc=f"eval {role}")
        rows[role] = {
            "parameters": count_parameters(loaded.model),
            "test_acc": round(res.accuracy, 2),
            "skills": {k: round(v["acc"], 1) for k, v in res.skills.items()},
            "build_s": manifest["build_seconds"],
            "eval_s": round(time.time() - start, 1),
        }
    writing = teacher_writing(folder / "teacher", split)
    vocab = vocab_report(str(folder / "teacher"), str(folder / "student"))
    skills = list(rows["teacher"]["skills"])
    print(f"Toy checkpoints ({'cold rebuild' if args.rebuild else 'shipped'}), held-out "
          f"synthetic test ({len(split.instances)} items), CQM-A:\n")
    print("| model | parameters | test acc | build s | " + " | ".join(skills) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(skills))
    for role, r in rows.items():
        print(f"| {role} | {r['parameters']:,} | {r['test_acc']:.2f} | {r['build_s']:.0f} | "
              + " | ".join(f"{r['skills'][s]:.1f}" for s in skills) + " |")
    ratio = rows["teacher"]["parameters"] / rows["student"]["parameters"]
    print(f"\nteacher/student parameter ratio: {ratio:.1f}")
    print(f"shared vocabulary: {vocab['shared_vocabulary']}")
    print(f"teacher writing: {writing['parsed']}/{writing['asked']} new instances parse "
          f"({writing['same_template']} ask the seed's kind of question)")
    if total_build is not None:
        print(f"cold build of both (wall): {total_build:.0f}s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak_mb:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "vocab": vocab,
                                               "writing": writing,
                                               "cold_build_s": total_build}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
