"""Calibration gain on the built-in default: targeted vs random vs no generation, and the
self-improving teacher.

Runs the built-in default (``mmdc run``, the settings of ``mmdc demo``) for each seed and
arm at equal budgets: every run trains the student for the same number of steps (the
config's), and the generating arms keep at most the same number of generated instances
per iteration (``generate.max_accepted``; the accepted counts are printed, so an arm
that fell short of the cap shows). The arms:

* ``targeted``: seeds from the probe questions the assessment marked hard and easy;
* ``random``: seeds drawn at random from the instruction pool;
* ``none``: nothing generated (plain distillation on the seed split);
* ``self-improve``: targeted, and the teacher learns its own verified instances
  (``loop.self_improve=true``).

Each run is a separate process, timed, with its peak resident memory; ``--jobs N`` runs N
at a time (each with its share of the CPU threads unless OMP_NUM_THREADS is set: the toy
models keep one core busy each, so on a 2-core machine two runs at a time use both). Prints the
held-out test accuracy of teacher and student after each iteration (mean and spread over
seeds), where the gain comes from per skill (rare in the seed split? marked hard by the
assessment? how many instances were generated for it?), and what self-improvement does
to the teacher's skills; writes it all as JSON and a PNG plot.

    python benchmarks/calibration_gain.py [--seeds 0 1 2] [--out runs/calibration_gain] [--jobs 1]
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

STRATEGIES = ("targeted", "random", "none", "self-improve")


def arm_overrides(strategy: str) -> list[str]:
    if strategy == "self-improve":
        return ["loop.strategy=targeted", "loop.self_improve=true"]
    return [f"loop.strategy={strategy}"]


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
    for k in range(1, args.iterations + 1):
        it = run_dir / f"iter_{k}"
        m = json.loads((it / "metrics.json").read_text())
        gen = json.loads((it / "generation_report.json").read_text())
        iters.append({
            "teacher": m["teacher"]["columns"]["Avg"]["acc"],
            "student": m["student"]["columns"]["Avg"]["acc"],
            "student_skills": {s: v["acc"] for s, v in m["student"]["skills"].items()},
            "teacher_skills": {s: v["acc"] for s, v in m["teacher"]["skills"].items()},
            # the self-improving teacher in the format it improves (CQM-LEA rationales)
            "rationale_skills": {s: v["acc"] for s, v in
                                 m.get("teacher_rationales", {}).get("skills", {}).items()},
            "accepted": gen.get("accepted", 0),
            "hard": json.loads((it / "assessment_summary.json").read_text()).get("per_skill", {}),
        })
    report = json.loads((run_dir / "report.json").read_text())
    baseline = json.loads((run_dir / "baseline" / "metrics.json").read_text())
    base = baseline["student"]
    teacher0 = {f: {s: v["acc"] for s, v in baseline[k]["skills"].items()}
                for f, k in (("CQM-A", "teacher"), ("CQM-LEA", "teacher_rationales"))
                if k in baseline}
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
                "rationale_skills": {s: mean_sd([i["rationale_skills"][s] for i in its])
                                     for s in sorted(its[0]["rationale_skills"])},
            })
        out[strategy] = {
            "iterations": per_iter,
            "wall_s": mean_sd([r["wall_s"] for r in rs]),
            "peak_mb": max(r["peak_mb"] for r in rs),
            "final_student": [r["iterations"][-1]["student"] for r in rs],
            "base_student": mean_sd([r["base_student"] for r in rs]),
            "base_teacher": {f: {k: mean_sd([r["base_teacher"][f][k] for r in rs])
                                 for k in rs[0]["base_teacher"][f]}
                             for f in rs[0]["base_teacher"]},
        }
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, s in summary.items():
        its = list(range(1, len(s["iterations"]) + 1))
        ax.errorbar(its, [i["student"][0] for i in s["iterations"]],
                    yerr=[i["student"][1] for i in s["iterations"]], marker="o", capsize=3,
                    label=f"student, {strategy}")
    first = next(iter(summary.values()))
    ax.plot(range(1, len(first["iterations"]) + 1),
            [i["teacher"][0] for i in first["iterations"]], "k--", label="teacher")
    ax.set(xlabel="iteration", ylabel="held-out test accuracy (%)",
           title="calibration gain (mean ± sd over seeds)")
    ax.set_xticks(range(1, len(first["iterations"]) + 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(summary: dict, ratio: float, seeds: list[int]) -> None:
    print(f"Calibration gain on the built-in default, seeds {seeds}, held-out synthetic test, "
          f"CQM-A accuracy (%), mean ± sd over seeds. student/teacher parameters: "
          f"1/{ratio:.1f}\n")
    print("| strategy | iter | teacher | student | accepted | wall s / run | peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = next(iter(summary.values()))["base_student"]
    print(f"| (before calibration) | 0 | | {base[0]:.1f} ± {base[1]:.1f} | | | |")
    for strategy, s in summary.items():
        for k, i in enumerate(s["iterations"], 1):
            print(f"| {strategy} | {k} | {i['teacher'][0]:.1f} | {i['student'][0]:.1f} ± "
                  f"{i['student'][1]:.1f} | {i['accepted'][0]:.1f} | {s['wall_s'][0]:.0f} | "
                  f"{s['peak_mb']} |")
    skills = sorted(next(iter(summary.values()))["iterations"][-1]["student_skills"])
    print("\nStudent after the last iteration, per skill (mean ± sd):\n")
    print("| strategy | " + " | ".join(skills) + " |")
    print("|---|" + "---:|" * len(skills))
    for strategy, s in summary.items():
        sk = s["iterations"][-1]["student_skills"]
        print(f"| {strategy} | " + " | ".join(f"{sk[x][0]:.0f} ± {sk[x][1]:.0f}"
                                              for x in skills) + " |")
    if "targeted" in summary:
        t = statistics.fmean(summary["targeted"]["final_student"])
        teacher = summary["targeted"]["iterations"][-1]["teacher"][0]
        print()
        for other in ("random", "none"):
            if other in summary:
                o = statistics.fmean(summary[other]["final_student"])
                print(f"targeted - {other} (last iteration): {t - o:+.1f} points")
        print(f"student/teacher accuracy (targeted, last iteration): {100 * t / teacher:.0f}%")


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
          "(targeted arm), accepted instances generated for it over all iterations, and the "
          "student after the last iteration.\n")
    gen_arms = [a for a in arms if a != "none"]
    head = (["skill", "seed share", "marked hard (it 1)"] + [f"generated, {a}" for a in gen_arms]
            + [f"student, {a}" for a in arms]
            + (["targeted - none"] if {"targeted", "none"} <= set(arms) else []))
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for skill in skills:
        hard = []
        for r in runs:
            if r["strategy"] == "targeted":
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
        if {"targeted", "none"} <= set(arms):
            cells.append(f"{final['targeted'] - final['none']:+.0f}")
        print("| " + " | ".join(cells) + " |")


def print_self_improve(summary: dict) -> None:
    """The self-improving teacher's skills against the teacher as given: in its rationale
    format (CQM-LEA), where it checks and improves itself, and in the eval format
    (CQM-A), where it must not lose."""
    if "self-improve" not in summary:
        return
    s = summary["self-improve"]
    its = s["iterations"]
    lea0 = {k: v[0] for k, v in s["base_teacher"]["CQM-LEA"].items()}
    a0 = {k: v[0] for k, v in s["base_teacher"]["CQM-A"].items()}
    print("\nSelf-improving teacher, per skill (mean over seeds): the teacher as given, then "
          "after each iteration; its rationales (CQM-LEA, where it checks itself) and its "
          "letters (CQM-A, the eval format).\n")
    skills = sorted(lea0)
    print("| format | when | " + " | ".join(skills) + " | avg |")
    print("|---|---|" + "---:|" * (len(skills) + 1))
    for fmt, base, key in (("CQM-LEA", lea0, "rationale_skills"), ("CQM-A", a0, "teacher_skills")):
        rows = [("as given", base)] + [(f"iter {k}", {x: v[0] for x, v in i[key].items()})
                                       for k, i in enumerate(its, 1)]
        for when, sk in rows:
            print(f"| {fmt} | {when} | " + " | ".join(f"{sk[x]:.1f}" for x in skills)
                  + f" | {statistics.fmean(sk.values()):.1f} |")
    weakest = min(lea0, key=lambda k: (lea0[k], k))
    path = " -> ".join(f"{i['rationale_skills'][weakest][0]:.1f}" for i in its)
    falls = [(i["teacher_skills"][k][0] - a0[k], k) for i in its for k in a0]
    falls += [(i["rationale_skills"][k][0] - lea0[k], k) for i in its for k in lea0
              if k != weakest]
    worst = min(falls, default=(0.0, "-"))
    t = statistics.fmean(s["final_student"])
    print(f"\nIts weakest skill, {weakest} (rationales): {lea0[weakest]:.1f} as given -> "
          f"{path} over the iterations; the largest fall of any other skill in either "
          f"format: {worst[0]:+.1f} points ({worst[1]}). The student under it ends at {t:.1f}"
          + (f" (targeted with a fixed teacher: "
             f"{statistics.fmean(summary['targeted']['final_student']):.1f})."
             if "targeted" in summary else "."))


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

    # the task is written once here, before runs that would race to write it
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
    print_self_improve(summary)
    (out / "calibration_gain.json").write_text(json.dumps(
        {"args": vars(args), "parameters": n, "summary": summary, "runs": runs}, indent=2))
    plot(summary, out / "calibration_gain.png")
    print(f"\nwrote {out / 'calibration_gain.json'} and {out / 'calibration_gain.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
