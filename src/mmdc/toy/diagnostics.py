"""Diagnostics for runs on the built-in synthetic task.

The synthetic task knows the hidden scene of every pool image, so each instance the
teacher writes can be checked against the truth (:func:`mmdc.toy.truth.solve`). The
method never sees any of this: it is read back from a finished run folder to explain its
outcome, and written into the run's report and the calibration-gain benchmark.

* label quality: how often the teacher's label is right on accepted instances and on
  each kind of rejected one (and how often the label it first wrote was right);
* coverage: how generated instances spread over skills, against the student's errors
  on the probe split;
* acceptance: the share of asked instances accepted and dropped, by drop reason.

:func:`writing_check` asks a model to write instances directly (no run folder), for the
toy-checkpoint benchmark and the recipe probe.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mmdc import artifacts
from mmdc.artifacts import DROP_REASONS
from mmdc.data.load import read_image_pool
from mmdc.data.pool import read_json, read_jsonl
from mmdc.errors import MmdcError
from mmdc.toy import truth, world

QUALITY_KEYS = ("n", "correct", "wrong", "ill_posed", "off_template")


def pool_scenes(root: str | Path, name: str = "pool") -> dict[str, dict] | None:
    """Image path -> hidden scene, or None when the pool carries no scenes (real data)."""
    try:
        rows = read_image_pool(root, name)
    except MmdcError:  # no pool, or a malformed one: no diagnostics, never an error
        return None
    scenes = {r["image"]: r["scene"] for r in rows if isinstance(r.get("scene"), dict)}
    return scenes or None


def check_record(record: dict, scenes: dict[str, dict], answer_key: str = "answer"
                 ) -> tuple[str | None, str]:
    """(skill, outcome) of one written instance: outcome is correct, wrong, ill_posed
    (a task template, but no right option on this image) or off_template."""
    image = record.get("image")
    scene = scenes.get(image) if image else None
    sol = truth.solve(record.get("question", ""), record.get("choices") or [], scene)
    if sol.skill is None:
        return None, "off_template"
    if sol.answer is None:
        return sol.skill, "ill_posed"
    answer = record.get(answer_key)
    if answer_key == "written_answer":
        answer = (record.get("meta") or {}).get("written_answer", record.get("answer"))
    return sol.skill, "correct" if answer == sol.answer else "wrong"


def _quality(records: list[dict], scenes: dict[str, dict], answer_key: str = "answer") -> dict:
    c = Counter(check_record(r, scenes, answer_key)[1] for r in records)
    out = {k: c.get(k, 0) for k in QUALITY_KEYS[1:]}
    out["n"] = len(records)
    judged = out["correct"] + out["wrong"]
    out["label_acc"] = round(100 * out["correct"] / judged, 1) if judged else None
    return out


def iteration_diagnostics(it: Path, scenes: dict[str, dict], probe: list | None = None) -> dict:
    """Diagnostics of one finished ``iter_k`` folder."""
    accepted = read_jsonl(it / artifacts.GENERATED_ACCEPTED) if (
        it / artifacts.GENERATED_ACCEPTED).is_file() else []
    rejected = read_jsonl(it / artifacts.GENERATED_REJECTED) if (
        it / artifacts.GENERATED_REJECTED).is_file() else []
    by_reason: dict[str, list[dict]] = {}
    for row in rejected:
        if "record" in row:  # malformed rows have no record to check
            by_reason.setdefault(row["reason"], []).append(row["record"])
    parsed = accepted + [r for records in by_reason.values() for r in records]
    quality = {"written": _quality(parsed, scenes, "written_answer"),
               "accepted": _quality(accepted, scenes),
               "accepted_as_written": _quality(accepted, scenes, "written_answer")}
    for reason, records in sorted(by_reason.items()):
        quality[reason] = _quality(records, scenes)
    generated_skills = Counter(check_record(r, scenes)[0] or "(off-template)" for r in accepted)
    report = read_json(it / artifacts.GENERATION_REPORT) if (
        it / artifacts.GENERATION_REPORT).is_file() else {}
    asked = report.get("asked", 0)
    acceptance = {"asked": asked, "accepted": report.get("accepted", 0),
                  "parsed": asked - report.get("dropped", {}).get("malformed", 0)}
    for reason in DROP_REASONS:
        acceptance[reason] = report.get("dropped", {}).get(reason, 0)
    student_errors: dict[str, dict] = {}
    if probe is not None and (it / artifacts.STUDENT_PROBE_ANSWERS).is_file():
        by_id = {i.id: i for i in probe}
        hard = {r["id"]: r["hard"] for r in read_jsonl(it / artifacts.ASSESSMENT)} if (
            it / artifacts.ASSESSMENT).is_file() else {}
        for row in read_jsonl(it / artifacts.STUDENT_PROBE_ANSWERS):
            inst = by_id.get(row["id"])
            if inst is None:
                continue
            s = student_errors.setdefault(inst.skill or "(none)", {"n": 0, "wrong": 0, "hard": 0})
            s["n"] += 1
            s["wrong"] += row.get("choice") != inst.answer
            s["hard"] += hard.get(inst.id) is True
    out = {"label_quality": quality, "generated_skills": dict(sorted(generated_skills.items())),
           "acceptance": acceptance, "student_probe_errors": dict(sorted(student_errors.items()))}
    if (it / artifacts.TEACHER_SELF_ASSESSMENT).is_file():
        out["teacher_self"] = _teacher_self(it, scenes, probe)
    return out


def _teacher_self(it: Path, scenes: dict[str, dict], probe: list | None) -> dict:
    """The self-improving teacher against the hidden truth: per skill, its letters'
    errors on the probes and how many it marked unreliable (letter and rationale
    disagree), and the precision of the labels it gave its own instances."""
    own = read_jsonl(it / artifacts.TEACHER_GENERATED_ACCEPTED) if (
        it / artifacts.TEACHER_GENERATED_ACCEPTED).is_file() else []
    per_skill: dict[str, dict] = {}
    by_id = {i.id: i for i in probe or []}
    for row in read_jsonl(it / artifacts.TEACHER_SELF_ASSESSMENT):
        inst = by_id.get(row["id"])
        if inst is None:
            continue
        s = per_skill.setdefault(inst.skill or "(none)",
                                 {"n": 0, "letter_wrong": 0, "rationale_wrong": 0,
                                  "unreliable": 0, "own_labels": 0, "own_right": 0})
        s["n"] += 1
        s["letter_wrong"] += row["letter"] != inst.answer
        s["rationale_wrong"] += row["rationale"] != inst.answer
        s["unreliable"] += bool(row["unreliable"])
    for record in own:
        skill, verdict = check_record(record, scenes)
        s = per_skill.setdefault(skill or "(off-template)",
                                 {"n": 0, "letter_wrong": 0, "rationale_wrong": 0,
                                  "unreliable": 0, "own_labels": 0, "own_right": 0})
        s["own_labels"] += 1
        s["own_right"] += verdict == "correct"
    return {"labels": _quality(own, scenes), "per_skill": dict(sorted(per_skill.items()))}


def run_diagnostics(run_dir: Path, iterations: int, scenes: dict[str, dict],
                    probe: list | None = None) -> dict[int, dict]:
    out = {}
    for k in range(1, iterations + 1):
        it = artifacts.iter_dir(run_dir, k)
        if not (it / artifacts.GENERATION_REPORT).is_file():
            break
        out[k] = iteration_diagnostics(it, scenes, probe)
    return out


def writing_check(model, processor, n: int = 96, seed: int = 0,
                  max_new_tokens: int = 128) -> dict[str, int]:
    """Ask ``model`` for a new instance like each of ``n`` held-out seeds (half "same",
    half "rarer"), each about a fresh pool-like image, and count how many parse and how
    those are judged on their image: correct, wrong, ill_posed, off_template."""
    import random

    from mmdc.data.prompts import build_write_prompt, parse_written
    from mmdc.generation import Request, generate

    rng = random.Random(f"mmdc-writing-check-{seed}")
    seeds = world.sample_instances(n, {k: 1.0 for k in world.SKILL_NAMES}, "writing-check",
                                   seed, "val")
    reqs, scenes = [], []
    for s in seeds:
        mode = "same" if rng.random() < 0.5 else "rarer"
        scene = world.random_scene(rng) if s.image is not None else None
        reqs.append(Request(build_write_prompt(s, mode),
                            world.draw_scene(scene) if scene else None))
        scenes.append(scene)
    outs = generate(model, processor, reqs, max_new_tokens=max_new_tokens, batch_size=32,
                    progress=False)
    c = Counter({k: 0 for k in ("parsed", *QUALITY_KEYS[1:])}, asked=n)
    for out, scene in zip(outs, scenes):
        try:
            fields = parse_written(out)
        except ValueError:
            continue
        c["parsed"] += 1
        sol = truth.solve(fields["question"], fields["choices"], scene)
        c["off_template" if sol.skill is None else "ill_posed" if sol.answer is None
          else "correct" if sol.answer == fields["answer"] else "wrong"] += 1
    return dict(c)


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f}%" if b else "-"


def format_diagnostics(diag: dict[int, dict]) -> str:
    """Markdown tables for the run report."""
    if not diag:
        return ""
    lines = ["## Diagnostics (built-in task ground truth, never seen by the method)", "",
             "Teacher writing: how many written instances parse, and how many of those are "
             "well-posed on their image with the label the teacher wrote.", "",
             "| iter | asked | parsed | well-posed, right label | ill-posed | wrong label "
             "| off-template |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for k, d in diag.items():
        a, w = d["acceptance"], d["label_quality"]["written"]
        parsed = a.get("parsed", w["n"])
        lines.append(f"| {k} | {a['asked']} | {parsed} ({_pct(parsed, a['asked'])}) | "
                     f"{w['correct']} ({_pct(w['correct'], w['n'])}) | {w['ill_posed']} | "
                     f"{w['wrong']} | {w['off_template']} |")
    lines += ["", "Teacher label accuracy on generated instances (correct / judged; ill-posed: a "
             "task template with no right option on that image; off-template: not one of the "
             "task's question kinds).", "",
             "| iter | set | n | label acc | correct | wrong | ill-posed | off-template |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for k, d in diag.items():
        for name, q in d["label_quality"].items():
            acc = "-" if q["label_acc"] is None else f"{q['label_acc']:.1f}%"
            lines.append(f"| {k} | {name.replace('_', ' ')} | {q['n']} | {acc} | {q['correct']} "
                         f"| {q['wrong']} | {q['ill_posed']} | {q['off_template']} |")
    lines += ["", "Acceptance by drop reason (share of instances asked for).", "",
              "| iter | asked | accepted | " + " | ".join(r.replace("_", " ")
                                                          for r in DROP_REASONS) + " |",
              "|---:|---:|---:|" + "---:|" * len(DROP_REASONS)]
    for k, d in diag.items():
        a = d["acceptance"]
        lines.append(f"| {k} | {a['asked']} | {_pct(a['accepted'], a['asked'])} | " + " | ".join(
            _pct(a[r], a["asked"]) for r in DROP_REASONS) + " |")
    lines += _format_teacher_self(diag)
    skills = sorted({s for d in diag.values() for s in d["student_probe_errors"]}
                    | {s for d in diag.values() for s in d["generated_skills"]})
    if skills:
        head = " | ".join(f"it{k} student errors | it{k} marked hard | it{k} generated"
                          for k in diag)
        lines += ["", "Generated (accepted) instances per skill against the student's probe "
                  "errors before generation.", "", f"| skill | {head} |",
                  "|---|" + "---:|" * (3 * len(diag))]
        for s in skills:
            cells = []
            for d in diag.values():
                e = d["student_probe_errors"].get(s)
                cells += [f"{e['wrong']}/{e['n']}" if e else "-",
                          str(e["hard"]) if e else "-", str(d["generated_skills"].get(s, 0))]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_teacher_self(diag: dict[int, dict]) -> list[str]:
    if not any("teacher_self" in d for d in diag.values()):
        return []
    lines = ["", "Self-improving teacher, per skill: its letters' errors on the probes, the "
             "probes it marked unreliable (letter and rationale disagree), and the labels it "
             "gave its own instances by its rationales (right / labelled).", "",
             "| iter | skill | probes | letter wrong | rationale wrong | marked unreliable "
             "| own labels right |", "|---:|---|---:|---:|---:|---:|---:|"]
    for k, d in diag.items():
        t = d.get("teacher_self")
        if not t:
            continue
        for skill, s in t["per_skill"].items():
            lines.append(f"| {k} | {skill} | {s['n']} | {s['letter_wrong']} | "
                         f"{s['rationale_wrong']} | {s['unreliable']} | "
                         f"{s['own_right']} / {s['own_labels']} |")
        q = t["labels"]
        acc = "-" if q["label_acc"] is None else f"{q['label_acc']:.1f}%"
        lines.append(f"| {k} | (all its own labels) | | | | | {q['correct']} / {q['n']} "
                     f"({acc}; ill-posed {q['ill_posed']}) |")
    return lines

