"""The run report: ``report.md`` (tables, plots, and in words what happened), and
``report.json`` beside it, read back from a run folder's artifacts."""

from __future__ import annotations

from pathlib import Path

from mmdc import artifacts
from mmdc.artifacts import DROP_REASONS
from mmdc.data.load import load_split
from mmdc.data.pool import read_json, write_json, write_text_atomic
from mmdc.errors import MmdcError
from mmdc.evaluation import format_columns, format_skills
from mmdc.toy.diagnostics import format_diagnostics


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def _avg(scores: dict) -> float:
    """Average accuracy of one model's ``{"columns": ..., "skills": ...}``."""
    return scores["columns"]["Avg"]["acc"]


def _changes(before: dict, after: dict, at_least: float = 2.0) -> str:
    """Skills whose accuracy moved by ``at_least`` points, largest move first."""
    moves = [(after[s]["acc"] - before[s]["acc"], s) for s in after if s in before]
    moves = sorted((m for m in moves if abs(m[0]) >= at_least), key=lambda m: -abs(m[0]))
    return ", ".join(f"{s} {before[s]['acc']:.0f} -> {after[s]['acc']:.0f}" for _, s in moves)


def _weakest(summary: dict, n: int = 3) -> str:
    """The skills with the largest share of probe questions marked hard."""
    rows = []
    for skill, c in summary.get("per_skill", {}).items():
        judged = c.get("hard", 0) + c.get("easy", 0)
        if judged and c.get("hard", 0):
            rows.append((c.get("hard", 0) / judged, skill, c.get("hard", 0), judged))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return ", ".join(f"{s} ({h} of {j} hard)" for _, s, h, j in rows[:n])


def _generated_per_skill(report: dict, diag: dict | None) -> str:
    if diag:  # the built-in task knows what each accepted instance really asks
        counts = diag.get("generated_skills", {})
    else:
        counts = {s: c.get("accepted", 0) for s, c in report.get("per_skill", {}).items()}
    counts = {s: n for s, n in counts.items() if n}
    return ", ".join(f"{s} {n}" for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _teacher_words(metrics: dict, before: dict | None, update: dict | None,
                   diag: dict | None) -> str:
    """The teacher's score; when it improves itself, where it found itself unreliable,
    what it labelled and learned, and how its letters moved."""
    letters = f"The teacher scored {_avg(metrics['teacher']):.2f}"
    if update is None:
        return letters + "."
    words = []
    t = (diag or {}).get("teacher_self")
    if t:
        weak = sorted(((s["unreliable"], k) for k, s in t["per_skill"].items()
                       if s.get("unreliable")), reverse=True)
        if weak:
            words.append("The teacher found itself unreliable (its letter and its rationale "
                         "disagree) on " + ", ".join(f"{k} ({n})" for n, k in weak[:4])
                         + " probe questions.")
    learned = (f"It labelled {update.get('instances', 0)} instances of its own by its "
               f"rationales")
    q = (t or {}).get("labels", {})
    if q.get("label_acc") is not None:
        learned += f" ({q['label_acc']:.0f}% right by the hidden truth)"
    words.append(learned + f" and learned its letters on them, replaying "
                 f"{update.get('replay', 0)} it answers consistently.")
    moved = _changes(before["skills"], metrics["teacher"]["skills"]) if before else ""
    words.append(letters + (f" with letters ({moved})." if moved else " with letters."))
    return " ".join(words)


def _ending(base: dict | None, last: dict | None) -> str:
    """The student at the end against the original teacher (the teacher before any
    calibration: the baseline's, else the first iteration's fixed teacher)."""
    if not last:
        return ""
    original = (base or {}).get("teacher") or last.get("original_teacher")
    if not original:
        return ""
    gap = _avg(last["student"]) - _avg(original)
    where = "above" if gap > 0 else "below" if gap < 0 else "level with"
    return (f"**In the end** the student scores {_avg(last['student']):.2f}, "
            f"{abs(gap):.2f} points {where} the original teacher ({_avg(original):.2f}).")


def narrative(run_dir: Path, iterations: int, diag: dict) -> list[str]:
    """In words: what the assessment found weak, what was generated and accepted for it,
    and how the student changed, per iteration."""
    lines = ["## What happened", ""]
    base = _read(run_dir / "baseline" / artifacts.METRICS)
    prev = base["student"] if base else None
    prev_teacher = (base or {}).get("teacher")
    first_teacher, last = None, None
    if prev:
        lines.append(f"Before calibration the student scored {_avg(prev):.2f} "
                     "on the held-out test.")
    for k in range(1, iterations + 1):
        it = artifacts.iter_dir(run_dir, k)
        metrics = _read(it / artifacts.METRICS)
        if metrics is None:
            break
        words = [f"**Iteration {k}.**"]
        summary = _read(it / artifacts.ASSESSMENT_SUMMARY) or {}
        total = summary.get("total", {})
        if total:
            weak = _weakest(summary)
            words.append(f"The assessment marked {total.get('hard', 0)} of "
                         f"{sum(total.values())} probe questions hard"
                         + (f"; the weakest skills: {weak}." if weak else "."))
        rep = _read(it / artifacts.GENERATION_REPORT) or {}
        if rep.get("asked"):
            dropped = {r: n for r, n in rep.get("dropped", {}).items() if n}
            per_skill = _generated_per_skill(rep, diag.get(k))
            words.append(
                f"The teacher wrote {rep['asked']} new instances and {rep['accepted']} were "
                "accepted" + (f" (per skill: {per_skill})" if per_skill else "")
                + ("; dropped: " + ", ".join(f"{n} {r.replace('_', ' ')}"
                                             for r, n in dropped.items()) if dropped else "")
                + ".")
        else:
            words.append("Nothing was generated (strategy none).")
        student = metrics["student"]
        acc = _avg(student)
        if prev:
            moved = _changes(prev["skills"], student["skills"])
            words.append(f"The student went from {_avg(prev):.2f} to "
                         f"{acc:.2f}" + (f" ({moved})." if moved else
                                         " (no skill moved by 2 points or more)."))
        else:
            words.append(f"The student scored {acc:.2f}.")
        words.append(_teacher_words(metrics, prev_teacher,
                                    _read(it / artifacts.TEACHER_UPDATE), diag.get(k)))
        prev_teacher = metrics["teacher"]
        lines += [" ".join(words), ""]
        prev = student
        last = {**metrics, "original_teacher": first_teacher or metrics["teacher"]}
        first_teacher = first_teacher or metrics["teacher"]
    ending = _ending(base, last)
    if ending:
        lines += [ending, ""]
    return lines


def narrative_text(run_dir: Path) -> str:
    """The report's "What happened" section as plain text, from ``report.json``."""
    report = _read(run_dir / artifacts.REPORT_JSON) or {}
    return "\n".join(line.replace("**", "") for line in report.get("narrative", [])[2:]).strip()


def write_report(run_dir: Path, iterations: int) -> Path:
    """``report.md``: per-iteration ScienceQA columns and skills, generation counts."""
    lines = [f"# MmDC run report: {run_dir}", ""]
    cols, skills, gen = {}, {}, []
    for k in range(1, iterations + 1):
        it = artifacts.iter_dir(run_dir, k)
        if not (it / artifacts.METRICS).is_file():
            break
        m = read_json(it / artifacts.METRICS)
        for role in ("teacher", "student"):
            cols[f"{role} (iter {k})"] = m[role]["columns"]
            skills[f"{role} (iter {k})"] = m[role]["skills"]
        rep = read_json(it / artifacts.GENERATION_REPORT)
        gen.append(f"| {k} | {rep.get('asked', 0)} | {rep.get('accepted', 0)} | " + " | ".join(
            str(rep.get("dropped", {}).get(r, 0)) for r in
            DROP_REASONS) + " |")
    base = _read(run_dir / "baseline" / artifacts.METRICS)
    if base:  # the student as given, before alignment
        cols = {"student (base)": base["student"]["columns"], **cols}
        skills = {"student (base)": base["student"]["skills"], **skills}
    diag = _diagnostics(run_dir, iterations)
    story = narrative(run_dir, iterations, diag)
    lines += story
    lines += ["## Held-out test: ScienceQA columns", "", format_columns(cols), "",
              "## Accuracy per skill", "", format_skills(skills), "",
              "## Generated instances", "",
              "| iter | asked | accepted | " + " | ".join(r.replace("_", " ") for r in DROP_REASONS)
              + " |", "|---:|---:|---:|" + "---:|" * len(DROP_REASONS), *gen, ""]
    if diag:
        lines += [format_diagnostics(diag)]
    plots = write_plots(run_dir, iterations)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    text = "\n".join(lines)
    write_json(run_dir / artifacts.REPORT_JSON, {"columns": cols, "skills": skills,
                                                 "diagnostics": diag or {},
                                                 "narrative": story})
    write_text_atomic(run_dir / artifacts.REPORT_MD, text)
    return run_dir / artifacts.REPORT_MD


def _diagnostics(run_dir: Path, iterations: int) -> dict:
    """Ground-truth diagnostics when the run's data is the built-in synthetic task."""
    from mmdc.config import load_config
    from mmdc.toy.diagnostics import pool_scenes, run_diagnostics

    try:
        cfg = load_config(run_dir / artifacts.CONFIG)
    except MmdcError:  # a report is still written without them
        return {}
    if cfg.data.format != "synthetic" or not cfg.data.pool:
        return {}
    scenes = pool_scenes(cfg.data.root, cfg.data.pool)
    if not scenes:
        return {}
    try:
        probe = load_split(cfg.data, cfg.data.probe_split).instances
    except MmdcError:
        probe = None
    return run_diagnostics(run_dir, iterations, scenes, probe)


def write_plots(run_dir: Path, iterations: int) -> list[Path]:
    """accuracy.png (overall and per skill, per iteration from 0, before calibration, with
    the original teacher as a line) and generated.png (accepted
    and dropped instances per skill, summed over iterations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its, metrics, per_skill_gen = [], [], {}
    for k in range(1, iterations + 1):
        it = artifacts.iter_dir(run_dir, k)
        if not (it / artifacts.METRICS).is_file():
            break
        its.append(k)
        metrics.append(read_json(it / artifacts.METRICS))
        rep = read_json(it / artifacts.GENERATION_REPORT)
        for skill, outcomes in rep.get("per_skill", {}).items():
            acc = per_skill_gen.setdefault(skill, {"accepted": 0, "dropped": 0})
            for outcome, n in outcomes.items():
                acc["accepted" if outcome == "accepted" else "dropped"] += n
    if not its:
        return []
    out = []
    # iteration 0: before calibration (the student as given; the original teacher)
    base = _read(run_dir / "baseline" / artifacts.METRICS) or {}
    original = base.get("teacher") or metrics[0]["teacher"]
    if base.get("student"):
        its, metrics = [0, *its], [{"student": base["student"], "teacher": original}, *metrics]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for role, style in (("teacher", "--"), ("student", "-")):
        axes[0].plot(its, [_avg(m[role]) for m in metrics], style,
                     marker="o", label=role)
    axes[0].axhline(_avg(original), color="grey", linestyle=":", label="original teacher")
    axes[0].set(title="held-out test accuracy", xlabel="iteration (0: before calibration)",
                ylabel="accuracy (%)")
    axes[0].legend()
    for skill in metrics[-1]["student"]["skills"]:
        axes[1].plot(its, [m["student"]["skills"].get(skill, {}).get("acc") for m in metrics],
                     marker="o", label=skill)
    axes[1].set(title="student accuracy per skill", xlabel="iteration")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(its)
    fig.tight_layout()
    out.append(run_dir / "accuracy.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
    if per_skill_gen:
        skills = sorted(per_skill_gen)
        fig, ax = plt.subplots(figsize=(max(5, len(skills)), 4))
        acc = [per_skill_gen[s]["accepted"] for s in skills]
        drop = [per_skill_gen[s]["dropped"] for s in skills]
        ax.bar(skills, acc, label="accepted")
        ax.bar(skills, drop, bottom=acc, label="dropped")
        ax.set(title="generated instances per skill", ylabel="instances")
        ax.legend()
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
        fig.tight_layout()
        out.append(run_dir / "generated.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
