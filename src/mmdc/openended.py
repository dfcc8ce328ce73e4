"""Open-ended evaluation in the LLaVA-Bench layout, scored by the judge referee.

Questions JSONL: ``{"question_id", "image", "text", "category"}`` (category conv, detail
or complex); reference answers JSONL: ``{"question_id", "text"}``. The candidate answers
every question; the judge scores reference and candidate 1-10 in both orders; the relative
score is mean(candidate) / mean(reference) x 100, per category and overall. Unparsable
judgements are counted, not scored.
"""

from __future__ import annotations

from pathlib import Path

from mmdc.data.images import MAX_IMAGE_PIXELS, load_image
from mmdc.data.pool import read_jsonl
from mmdc.errors import DataError
from mmdc.generation import Request


def read_bench(questions: str | Path, references: str | Path) -> list[dict]:
    qs = read_jsonl(questions)
    refs = {}
    for n, r in enumerate(read_jsonl(references), 1):
        if not isinstance(r, dict) or "question_id" not in r or "text" not in r:
            raise DataError(f"{references}, line {n}: needs 'question_id' and 'text'")
        refs[r["question_id"]] = r["text"]
    rows = []
    for n, q in enumerate(qs, 1):
        for key in ("question_id", "text"):
            if not isinstance(q, dict) or key not in q:
                raise DataError(f"{questions}, line {n}: missing field '{key}'")
        if q["question_id"] not in refs:
            raise DataError(f"{questions}, line {n}: question {q['question_id']!r} has no "
                            f"reference answer in {references}")
        rows.append({**q, "reference": refs[q["question_id"]],
                     "category": q.get("category", "all")})
    if not rows:
        raise DataError(f"{questions}: no questions")
    return rows


def relative_scores(rows: list[dict], pairs: list[tuple[float, float] | None]) -> dict:
    """Per category and overall: mean reference and candidate scores, relative score."""
    out: dict[str, dict] = {}
    for row, pair in zip(rows, pairs, strict=True):
        for cat in (row["category"], "overall"):
            c = out.setdefault(cat, {"reference": 0.0, "candidate": 0.0, "scored": 0,
                                     "unparsable": 0})
            if pair is None:
                c["unparsable"] += 1
            else:
                c["reference"] += pair[0]
                c["candidate"] += pair[1]
                c["scored"] += 1
    for c in out.values():
        if c["scored"]:
            c["reference"] /= c["scored"]
            c["candidate"] /= c["scored"]
            c["relative"] = 100.0 * c["candidate"] / c["reference"]
        else:
            c["reference"] = c["candidate"] = c["relative"] = None
    return out


def evaluate_open_ended(candidate, judge_referee, rows: list[dict], image_root: str | Path,
                        max_new_tokens: int = 128, batch_size: int = 16,
                        max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[dict, list[dict]]:
    images = [load_image(image_root, r["image"], f"question {r['question_id']!r}", max_pixels)
              if r.get("image") else None for r in rows]
    answers = candidate.generate([Request(r["text"], img) for r, img in zip(rows, images)],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 desc="answer")
    pairs = judge_referee.score_pairs([r["text"] for r in rows], images,
                                      [r["reference"] for r in rows], answers)
    samples = [{"question_id": r["question_id"], "category": r["category"], "answer": a,
                "scores": list(p) if p else None} for r, a, p in zip(rows, answers, pairs)]
    return relative_scores(rows, pairs), samples


def format_relative(scores: dict) -> str:
    cats = [c for c in ("conv", "detail", "complex") if c in scores] + sorted(
        c for c in scores if c not in ("conv", "detail", "complex", "overall")) + ["overall"]
    lines = ["| category | relative score | candidate | reference | scored | unparsable |",
             "|---|---:|---:|---:|---:|---:|"]
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    for c in cats:
        s = scores[c]
        lines.append(f"| {c} | {f(s['relative'])} | {f(s['candidate'])} | {f(s['reference'])} "
                     f"| {s['scored']} | {s['unparsable']} |")
    return "\n".join(lines)
