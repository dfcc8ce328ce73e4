"""Calibration gain on the built-in default: the paper's method (targeted generation and
a self-improving teacher) against its ablations, and where the student ends against the
original teacher.

Runs the built-in default (``mmdc run``, the settings of ``mmdc demo``) for each seed and
arm at equal budgets: every run trains the student for the same number of steps (the
config's), and the generating arms keep at most the same number of generated instances
per iteration (``generate.max_accepted``; the accepted counts are printed, so an arm
that fell short of the cap shows). The arms:

* ``self-improve``: the default: seeds from the probe questions the assessment marked
  hard, and the teacher improves itself, label-free, where its letter and its rationale
  disagree (``improve.enabled=true``);
* ``fixed-teacher``: the same, with the teacher as given (``improve.enabled=false``);
* ``random``: seeds drawn at random from the instruction pool (the teacher still
  improves itself);
* ``none``: plain distillation: nothing generated, the teacher as given.

Each run is a separate process, timed, with its peak resident memory; ``--jobs N`` runs N
at a time (each with its share of the CPU threads unless OMP_NUM_THREADS is set: the toy
models keep one core busy each, so on a 2-core machine two runs at a time use both). Prints the
held-out test accuracy of teacher and student after each iteration (mean and spread over
seeds), the margins, where the gain comes from per skill, and what the self-improving
teacher found, labelled and learned; writes it all as JSON and a PNG plot.

    python benchmarks/calibration_gain.py [--seeds 0 1 2] [--out runs/calibration_gain] [--jobs 2]
    python benchmarks/calibration_gain.py data.synth.seed=7 data.root=data/synthetic-7
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STRATEGIES = ("self-improve", "fixed-teacher", "random", "none")
DEFAULT_ARM = "self-improve"


def arm_overrides(strategy: str) -> list[str]:
    return {"self-improve": ["loop.strategy=targeted", "improve.enabled=true"],
            "fixed-teacher": ["loop.strategy=targeted", "improve.enabled=false"],
            "random": ["loop.strategy=random", "improve.enabled=true"],
            "none": ["loop.strategy=none", "improve.enabled=false"]}[strategy]


def child(run_dir: str, overrides: list[str]) -> int:
    """Run one calibration in this process; print wall time and peak memory as JSON."""
    from mmdc.cli import main

    start = time.time()
    rc = main(["run", f"run_dir={run_dir}", *overrides])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("MMDC_BENCH " + json.dumps({"rc": rc, "wall_s": round(time.time() - start, 1),
                                      "peak_mb": round(peak)}))
    return rc


def run_one(out: Path, seed: int, strategy: str, args) -> dict:
    run_dir = out / f"seed{seed}_{strategy}"
    # a fresh run every time: resuming a folder from an earlier benchmark would skip its
    # finished steps and report their (possibly stale) results and a meaningless wall time
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"seed={seed}", *arm_overrides(strategy), *args.override]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    proc = subprocess.run([sys.executable, __file__, "--child", str(run_dir), *overrides],
                          capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MMDC_BENCH ")]
    if proc.returncode != 0 or not line:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"run {run_dir} failed (exit {proc.returncode})")
    info = json.loads(line[-1][len("MMDC_BENCH "):])
    iters = []
    m1 = json.loads((run_dir / "iter_1" / "metrics.json").read_text())
    for k in range(1, args.iterations + 1):
        it = run_dir / f"iter_{k}"
        m = json.loads((it / "metrics.json").read_text())
        gen = json.loads((it / "generation_report.json").read_text())
        iters.append({
            "teacher": m["teacher"]["columns"]["Avg"]["acc"],
            "student": m["student"]["columns"]["Avg"]["acc"],
            "student_skills": {s: v["acc"] for s, v in m["student"]["skills"].items()},
            "teacher_skills": {s: v["acc"] for s, v in m["teacher"]["skills"].items()},
            "accepted": gen.get("accepted", 0),
            "hard": json.loads((it / "assessment_summary.json").read_text()).get("per_skill", {}),
        })
    report = json.loads((run_dir / "report.json").read_text())
    baseline = json.loads((run_dir / "baseline" / "metrics.json").read_text())
    base = baseline["student"]
    # the original teacher: evaluated at the baseline when it improves itself, else the
    # fixed teacher of the first iteration
    teacher0 = {"CQM-A": {s: v["acc"] for s, v in (baseline.get("teacher") or m1["teacher"])
                          ["skills"].items()},
                "Avg": (baseline.get("teacher") or m1["teacher"])["columns"]["Avg"]["acc"]}
    if "teacher_rationales" in baseline:
        teacher0["CQM-LEA"] = {s: v["acc"] for s, v in
                               baseline["teacher_rationales"]["skills"].items()}
    return {"seed": seed, "strategy": strategy, "run_dir": str(run_dir), **info,
            "base_student": base["columns"]["Avg"]["acc"], "base_teacher": teacher0,
            "iterations": iters, "diagnostics": report.get("diagnostics", {})}


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float]) -> str:
    m, s = mean_sd(xs)
    return f"{m:.1f} ± {s:.1f}"


def summarize(runs: list[dict], iterations: int) -> dict:
    out = {}
    for strategy in STRATEGIES:
        rs = [r for r in runs if r["strategy"] == strategy]
        if not rs:
            continue
        per_iter = []
        for k in range(iterations):
            its = [r["iterations"][k] for r in rs]
            skills = sorted(its[0]["student_skills"])
            per_iter.append({
                "teacher": mean_sd([i["teacher"] for i in its]),
                "student": mean_sd([i["student"] for i in its]),
                "accepted": mean_sd([i["accepted"] for i in its]),
                "teacher_skills": {s: mean_sd([i["teacher_skills"][s] for i in its])
                                   for s in sorted(its[0]["teacher_skills"])},
                "student_skills": {s: mean_sd([i["student_skills"][s] for i in its])
                                   for s in skills},
            })
        out[strategy] = {
            "iterations": per_iter,
            "wall_s": mean_sd([r["wall_s"] for r in rs]),
            "peak_mb": max(r["peak_mb"] for r in rs),
            "final_student": [r["iterations"][-1]["student"] for r in rs],
            "base_student": mean_sd([r["base_student"] for r in rs]),
            "base_teacher": {f: {k: mean_sd([r["base_teacher"][f][k] for r in rs])
                                 for k in rs[0]["base_teacher"][f]}
                             for f in ("CQM-A", "CQM-LEA") if f in rs[0]["base_teacher"]},
            "original_teacher": mean_sd([r["base_teacher"]["Avg"] for r in rs]),
        }
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    first = next(iter(summary.values()))
    n = len(first["iterations"])
    for strategy, s in summary.items():
        ax.errorbar(range(n + 1), [s["base_student"][0]] + [i["student"][0] for i in s["iterations"]],
                    yerr=[s["base_student"][1]] + [i["student"][1] for i in s["iterations"]],
                    marker="o", capsize=3, label=f"student, {strategy}")
    if DEFAULT_ARM in summary:
        d = summary[DEFAULT_ARM]
        ax.plot(range(n + 1), [d["original_teacher"][0]] + [i["teacher"][0] for i in d["iterations"]],
                "k--", label="teacher, self-improving")
    ax.axhline(first["original_teacher"][0], color="grey", linestyle=":", label="original teacher")
    ax.set(xlabel="iteration (0: before calibration)", ylabel="held-out test accuracy (%)",
           title="calibration gain (mean ± sd over seeds)")
    ax.set_xticks(range(n + 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(summary: dict, ratio: float, seeds: list[int]) -> None:
    print(f"Calibration gain on the built-in default, seeds {seeds}, held-out synthetic test, "
          f"CQM-A accuracy (%), mean ± sd over seeds. student/teacher parameters: "
          f"1/{ratio:.1f}\n")
    print("| arm | iter | teacher | student | accepted | wall s / run | peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    first = next(iter(summary.values()))
    base, t0 = first["base_student"], first["original_teacher"]
    print(f"| (before calibration) | 0 | {t0[0]:.1f} | {base[0]:.1f} ± {base[1]:.1f} | | | |")
    for strategy, s in summary.items():
        for k, i in enumerate(s["iterations"], 1):
            print(f"| {strategy} | {k} | {i['teacher'][0]:.1f} | {i['student'][0]:.1f} ± "
                  f"{i['student'][1]:.1f} | {i['accepted'][0]:.1f} | {s['wall_s'][0]:.0f} | "
                  f"{s['peak_mb']} |")
    skills = sorted(first["iterations"][-1]["student_skills"])
    print("\nStudent after the last iteration, per skill (mean ± sd):\n")
    print("| arm | " + " | ".join(skills) + " |")
    print("|---|" + "---:|" * len(skills))
    for strategy, s in summary.items():
        sk = s["iterations"][-1]["student_skills"]
        print(f"| {strategy} | " + " | ".join(f"{sk[x][0]:.0f} ± {sk[x][1]:.0f}"
                                              for x in skills) + " |")
    if DEFAULT_ARM in summary:
        d = summary[DEFAULT_ARM]
        t = statistics.fmean(d["final_student"])
        print()
        for other in STRATEGIES[1:]:
            if other in summary:
                o = statistics.fmean(summary[other]["final_student"])
                print(f"{DEFAULT_ARM} - {other} (last iteration): {t - o:+.1f} points")
        print(f"student ({DEFAULT_ARM}, last iteration) - original teacher: "
              f"{t - d['original_teacher'][0]:+.1f} points ({t:.1f} against "
              f"{d['original_teacher'][0]:.1f})")


def _generated(run: dict) -> dict[str, int]:
    """Accepted instances per skill over the run's iterations (the task's ground truth)."""
    out: dict[str, int] = {}
    for d in run["diagnostics"].values():
        for skill, n in d.get("generated_skills", {}).items():
            out[skill] = out.get(skill, 0) + n
    return out


def print_sources(runs: list[dict], summary: dict, seed_share: dict[str, float]) -> None:
    """Per skill: how rare the seed split makes it, how much of it the first assessment
    marked hard, how many instances each arm generated for it, and the student after the
    last iteration under each arm."""
    arms = list(summary)
    skills = sorted(next(iter(summary.values()))["iterations"][-1]["student_skills"])
    print("\nWhere the gain comes from, per skill (means over seeds): the skill's share of the "
          "seed split, the share of its probe questions the first assessment marked hard "
          f"({DEFAULT_ARM} arm), accepted instances generated for it over all iterations, and the "
          "student after the last iteration.\n")
    gen_arms = [a for a in arms if a != "none"]
    head = (["skill", "seed share", "marked hard (it 1)"] + [f"generated, {a}" for a in gen_arms]
            + [f"student, {a}" for a in arms]
            + ([f"{DEFAULT_ARM} - none"] if {DEFAULT_ARM, "none"} <= set(arms) else []))
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for skill in skills:
        hard = []
        for r in runs:
            if r["strategy"] == DEFAULT_ARM:
                c = r["iterations"][0]["hard"].get(skill, {})
                judged = c.get("hard", 0) + c.get("easy", 0)
                if judged:
                    hard.append(100 * c.get("hard", 0) / judged)
        cells = [skill, f"{100 * seed_share.get(skill, 0):.0f}%",
                 f"{statistics.fmean(hard):.0f}%" if hard else "-"]
        for a in gen_arms:
            cells.append(f"{statistics.fmean(_generated(r).get(skill, 0) for r in runs if r['strategy'] == a):.1f}")
        final = {a: summary[a]["iterations"][-1]["student_skills"][skill][0] for a in arms}
        cells += [f"{final[a]:.0f}" for a in arms]
        if {DEFAULT_ARM, "none"} <= set(arms):
            cells.append(f"{final[DEFAULT_ARM] - final['none']:+.0f}")
        print("| " + " | ".join(cells) + " |")


def print_self_improve(runs: list[dict], summary: dict) -> None:
    """The self-improving teacher: where it found itself unreliable (first iteration), its
    letters per skill as given and after each iteration, how right its self-made labels
    were by the hidden truth, and how the skills it did not mark moved."""
    if DEFAULT_ARM not in summary:
        return
    s = summary[DEFAULT_ARM]
    rs = [r for r in runs if r["strategy"] == DEFAULT_ARM]
    a0 = {k: v[0] for k, v in s["base_teacher"]["CQM-A"].items()}
    lea0 = {k: v[0] for k, v in s["base_teacher"].get("CQM-LEA", {}).items()}
    skills = sorted(a0)
    print("\nSelf-improving teacher, per skill (mean over seeds): its letters (CQM-A, the "
          "eval format) as given and after each iteration, and its rationales (CQM-LEA) as "
          "given.\n")
    print("| format | when | " + " | ".join(skills) + " | avg |")
    print("|---|---|" + "---:|" * (len(skills) + 1))
    rows = [("CQM-LEA", "as given", lea0)] if lea0 else []
    rows += [("CQM-A", "as given", a0)] + [
        ("CQM-A", f"iter {k}", {x: v[0] for x, v in i["teacher_skills"].items()})
        for k, i in enumerate(s["iterations"], 1)]
    for fmt, when, sk in rows:
        print(f"| {fmt} | {when} | " + " | ".join(f"{sk[x]:.1f}" for x in skills)
              + f" | {statistics.fmean(sk.values()):.1f} |")
    marked: dict[str, int] = {}
    probes: dict[str, int] = {}
    labels = {"correct": 0, "wrong": 0, "ill_posed": 0, "n": 0}
    per_iter = []
    for k in range(1, len(s["iterations"]) + 1):
        q = {"correct": 0, "n": 0, "judged": 0}
        for r in rs:
            t = r["diagnostics"].get(str(k), r["diagnostics"].get(k, {})).get("teacher_self")
            if not t:
                continue
            for key in labels:
                labels[key] += t["labels"].get(key, 0)
            q["correct"] += t["labels"]["correct"]
            q["n"] += t["labels"]["n"]
            q["judged"] += t["labels"]["correct"] + t["labels"]["wrong"]
            if k == 1:
                for skill, c in t["per_skill"].items():
                    marked[skill] = marked.get(skill, 0) + c["unreliable"]
                    probes[skill] = probes.get(skill, 0) + c["n"]
        per_iter.append(q)
    # a skill counts as marked when at least a tenth of its probes were
    weak = sorted(k for k, n in marked.items() if probes.get(k) and n >= 0.1 * probes[k])
    print("\nProbes marked unreliable in iteration 1 (letter and rationale disagree), summed "
          "over seeds: " + ", ".join(f"{k} {marked[k]}/{probes[k]}" for k in sorted(marked)
                                     if marked[k]))
    last = {x: v[0] for x, v in s["iterations"][-1]["teacher_skills"].items()}
    if weak:
        before = statistics.fmean(a0[k] for k in weak)
        after = statistics.fmean(last[k] for k in weak)
        print(f"Its letters on the skills it marked ({', '.join(weak)}): {before:.1f} as given "
              f"-> {after:.1f} after the last iteration ({after - before:+.1f} points)")
    others = [(last[k] - a0[k], k) for k in skills if k not in weak]
    worst = min(others, default=(0.0, "-"))
    print(f"Largest fall of a skill it did not mark: {worst[0]:+.1f} points ({worst[1]})")
    judged = labels["correct"] + labels["wrong"]
    print("Precision of its self-made labels by the hidden truth, per iteration (pooled over "
          "seeds): " + ", ".join(
              f"iter {k}: {q['correct']}/{q['judged']}" + (f" ({100 * q['correct'] / q['judged']:.0f}%)"
                                                          if q["judged"] else "")
              for k, q in enumerate(per_iter, 1))
          + (f"; all: {100 * labels['correct'] / judged:.1f}% of {judged} judged "
             f"({labels['ill_posed']} ill-posed)" if judged else ""))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--out", default="runs/calibration_gain")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="runs at a time (default 2, or 1 on a one-core machine: so the "
                         "whole benchmark fits in 60 minutes on a 2-core machine)")
    ap.add_argument("override", nargs="*", help="key=value config overrides for every run, "
                    "e.g. data.synth.seed=7 data.root=DIR (default: the built-in default)")
    # key=value overrides may come anywhere on the line (after --strategies too)
    argv = sys.argv[1:]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = ap.parse_args([a for a in argv if a not in overrides])
    args.override = overrides
    from mmdc.config import load_config

    cfg = load_config(None, args.override)
    args.iterations = cfg.loop.iterations
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from mmdc.data.load import load_split
    from mmdc.toy.task import prepare_data

    # the task is written once here, before runs that would race to write it
    prepare_data(cfg.data)
    seed_split = load_split(cfg.data, cfg.data.seed_split)

    def timed(job: tuple[int, str]) -> dict:
        start = time.time()
        run = run_one(out, *job, args)
        print(f"seed {job[0]} {job[1]}: student {run['iterations'][-1]['student']:.2f} "
              f"({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
        return run

    jobs = [(seed, strategy) for seed in args.seeds for strategy in args.strategies]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        runs = list(pool.map(timed, jobs))
    from mmdc.models.load import count_parameters, load_model

    n = {role: count_parameters(load_model(getattr(cfg, role).path, device="cpu").model)
         for role in ("teacher", "student")}
    ratio = n["teacher"] / n["student"]
    summary = summarize(runs, args.iterations)
    print_table(summary, ratio, args.seeds)
    seed = [i.skill for i in seed_split.instances]
    print_sources(runs, summary, {k: seed.count(k) / len(seed) for k in set(seed)})
    print_self_improve(runs, summary)
    (out / "calibration_gain.json").write_text(json.dumps(
        {"args": vars(args), "parameters": n, "summary": summary, "runs": runs}, indent=2))
    plot(summary, out / "calibration_gain.png")
    print(f"\nwrote {out / 'calibration_gain.json'} and {out / 'calibration_gain.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
