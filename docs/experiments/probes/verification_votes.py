"""What does the teacher's verification keep and drop on the built-in task, and why?

Every instance the teacher wrote that reached verification (accepted; or dropped as
unverified, not challenging or over budget) carries its written label and the teacher's
k sampled answers (``meta``). This sorts them by the vote pattern, whether the k samples
agree all and whether the written label is theirs, and judges each against the task's
ground truth (:func:`mmdc.toy.diagnostics.check_record`: the samples' label right or
wrong, or the question ill-posed on its image), per skill. With ``verify.written_vote``
on (the default) and tau 0.9, only "unanimous, written agrees" is kept; the row
"unanimous, written differs" is what turning it off would add.

    python docs/experiments/probes/verification_votes.py runs/cg/seed0_targeted runs/cg/seed1_targeted
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

VERIFIED = ("not_challenging", "over_budget")


def pattern(meta: dict) -> tuple[str, int | None]:
    from mmdc.stages.verify import majority

    label, share = majority(list(meta.get("votes", [])))
    agree = "unanimous" if share == 1.0 else "split"
    written = "written agrees" if meta.get("written_answer") == label else "written differs"
    return f"{agree}, {written}", label


def tally(run: Path, counts: collections.Counter) -> None:
    import yaml

    from mmdc.data.pool import read_jsonl
    from mmdc.toy.diagnostics import check_record, pool_scenes

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    scenes = pool_scenes(cfg["data"]["root"]) or {}
    for it in sorted(run.glob("iter_*")):
        rows = [("accepted", r) for r in read_jsonl(it / "generated_accepted.jsonl")]
        rows += [(r["reason"], r["record"]) for r in read_jsonl(it / "generated_rejected.jsonl")
                 if r["reason"] in ("unverified", *VERIFIED)]
        for reason, rec in rows:
            name, label = pattern(rec.get("meta") or {})
            skill, outcome = check_record({**rec, "answer": label}, scenes)
            kept = "kept" if reason == "accepted" or reason in VERIFIED else "unverified"
            counts[(name, kept, skill or "(off-template)", outcome)] += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders of the built-in task")
    args = ap.parse_args()
    counts: collections.Counter = collections.Counter()
    for run in args.runs:
        tally(run, counts)
    print(f"Instances that reached verification in {len(args.runs)} run(s), by vote pattern "
          "(the teacher's k samples; its written label) and the samples' label against the "
          "task's ground truth\n")
    print("| votes | outcome | skill | right | wrong | ill-posed | n |")
    print("|---|---|---|---:|---:|---:|---:|")
    keys = sorted({k[:3] for k in counts})
    for name, kept, skill in keys:
        c = {o: counts[(name, kept, skill, o)] for o in ("correct", "wrong", "ill_posed")}
        n = sum(counts[(name, kept, skill, o)] for o in
                ("correct", "wrong", "ill_posed", "off_template"))
        print(f"| {name} | {kept} | {skill} | {c['correct']} | {c['wrong']} | "
              f"{c['ill_posed']} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
