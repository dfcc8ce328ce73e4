"""ScienceQA-protocol evaluation: column table, per-skill accuracy, result files.

Columns follow the official ScienceQA scorer: NAT / SOC / LAN by subject, TXT (the
context/hint is non-empty), IMG (an image is present), NO (neither), G1-6 / G7-12 by
grade, and Avg over everything. TXT and IMG overlap; NO is the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from mmdc.answering import ask
from mmdc.data.pool import write_json, write_jsonl
from mmdc.data.record import LETTERS, Instance

log = logging.getLogger(__name__)

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
SUBJECT_COLUMN = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def columns_of(inst: Instance) -> list[str]:
    cols = []
    if inst.subject in SUBJECT_COLUMN:
        cols.append(SUBJECT_COLUMN[inst.subject])
    if inst.has_context:
        cols.append("TXT")
    if inst.has_image:
        cols.append("IMG")
    if not inst.has_context and not inst.has_image:
        cols.append("NO")
    if inst.grade is not None:
        cols.append("G1-6" if inst.grade <= 6 else "G7-12")
    cols.append("Avg")
    return cols


def column_scores(instances: list[Instance], predictions: list[int | None]) -> dict:
    """Accuracy (percent) and counts per ScienceQA column; None where a column is empty."""
    hits = {c: 0 for c in COLUMNS}
    totals = {c: 0 for c in COLUMNS}
    for inst, pred in zip(instances, predictions, strict=True):
        ok = pred is not None and pred == inst.answer
        for col in columns_of(inst):
            totals[col] += 1
            hits[col] += ok
    return {c: {"acc": (100.0 * hits[c] / totals[c]) if totals[c] else None,
                "correct": hits[c], "count": totals[c]} for c in COLUMNS}


def skill_scores(instances: list[Instance], predictions: list[int | None]) -> dict:
    out: dict[str, dict] = {}
    for inst, pred in zip(instances, predictions, strict=True):
        s = out.setdefault(inst.skill or "(none)", {"correct": 0, "count": 0})
        s["count"] += 1
        s["correct"] += pred is not None and pred == inst.answer
    for s in out.values():
        s["acc"] = 100.0 * s["correct"] / s["count"]
    return dict(sorted(out.items()))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_columns(rows: dict[str, dict]) -> str:
    """A markdown table: one row per model name, the ScienceQA columns."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, cols in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cols[c]["acc"]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def format_skills(rows: dict[str, dict], max_columns: int = 10) -> str:
    """Accuracy per skill as a markdown table: one column per skill when there are few
    (the built-in task's eight), one row per skill when there are more (ScienceQA's 69)."""
    skills = sorted({s for r in rows.values() for s in r})

    def cell(r, s):
        return _fmt(r[s]["acc"]) if s in r else "-"

    if len(skills) > max_columns:
        names = list(rows)
        lines = ["| skill | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {s} | " + " | ".join(cell(rows[n], s) for n in names) + " |"
                  for s in skills]
        return "\n".join(lines)
    lines = ["| model | " + " | ".join(skills) + " |", "|---|" + "---:|" * len(skills)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r, s) for s in skills) + " |")
    return "\n".join(lines)


@dataclass
class EvalResult:
    instances: list[Instance]
    prompts: list[str]
    outputs: list[str]
    predictions: list[int | None]
    columns: dict = field(default_factory=dict)
    skills: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.columns["Avg"]["acc"]

    def llava_result(self) -> dict:
        """LLaVA's ScienceQA result file (-1 marks an unparsable answer)."""
        correct = self.columns["Avg"]["correct"]
        return {
            "acc": self.accuracy, "correct": correct, "count": len(self.instances),
            "results": {i.id: (-1 if p is None else p)
                        for i, p in zip(self.instances, self.predictions)},
            "outputs": {i.id: o for i, o in zip(self.instances, self.outputs)},
        }

    def log_samples(self) -> list[dict]:
        """Per-sample rows in lmms-eval's ``--log_samples`` schema."""
        rows = []
        for n, (inst, prompt, out, pred) in enumerate(
                zip(self.instances, self.prompts, self.outputs, self.predictions)):
            rows.append({
                "doc_id": n, "id": inst.id, "input": prompt, "target": inst.answer_letter,
                "resps": [[out]], "filtered_resps": ["" if pred is None else LETTERS[pred]],
                "exact_match": float(pred is not None and pred == inst.answer),
                "skill": inst.skill,
            })
        return rows

    def save(self, out_dir: str | Path, name: str) -> dict[str, Path]:
        out_dir = Path(out_dir)
        paths = {
            "result": write_json(out_dir / f"{name}_result.json", self.llava_result()),
            "samples": write_jsonl(out_dir / f"{name}_samples.jsonl", self.log_samples()),
            "metrics": write_json(out_dir / f"{name}_metrics.json",
                                  {"columns": self.columns, "skills": self.skills}),
        }
        return paths


def evaluate(generator, split, *, fmt: str = "CQM-A", batch_size: int = 64,
             max_new_tokens: int = 8, limit: int | None = None, desc: str = "eval") -> EvalResult:
    """Answer every instance of a :class:`~mmdc.data.load.Split` and score it."""
    instances = [i for i in split.instances if i.answer is not None and i.choices]
    if limit:
        instances = instances[:limit]
    for inst in instances:  # load (and check) every image before generating anything
        split.image(inst)
    prompts, outputs, preds = ask(generator, instances, [split.image(i) for i in instances],
                                  fmt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  desc=desc)
    return EvalResult(instances, prompts, outputs, preds,
                      column_scores(instances, preds), skill_scores(instances, preds))
