"""LLaVA instruction JSON, both directions.

An entry is ``{"id", "image"?, "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": ...}]}``. Entries whose human turn is a CQM prompt (as
:func:`to_llava` writes them) read back into full multiple-choice records; any other entry
becomes an open-ended record whose reference answer is kept in ``meta["reference"]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from mmdc.data.images import resolve_image
from mmdc.data.pool import read_text, write_json
from mmdc.data.prompts import build_prompt, build_target, parse_answer
from mmdc.data.record import LETTERS, Instance
from mmdc.errors import DataError

IMAGE_TAG = "<image>"
_CQM = re.compile(
    r"^Context: (?P<context>.*?)\nQuestion: (?P<question>.*?)\nOptions: (?P<options>.*?)\n",
    re.DOTALL,
)
_OPTION = re.compile(r"\(([A-Z])\) ")


def to_llava(instances: Iterable[Instance], fmt: str = "CQM-LEA") -> list[dict]:
    """Records -> LLaVA conversation entries (labelled records only)."""
    out = []
    for inst in instances:
        human = build_prompt(inst, fmt)
        if inst.image is not None:
            human = f"{IMAGE_TAG}\n{human}"
        entry = {"id": inst.id}
        if inst.image is not None:
            entry["image"] = inst.image
        entry["conversations"] = [{"from": "human", "value": human},
                                  {"from": "gpt", "value": build_target(inst, fmt)}]
        out.append(entry)
    return out


def write_llava_json(path: str | Path, instances: Iterable[Instance], fmt: str = "CQM-LEA") -> Path:
    return write_json(path, to_llava(instances, fmt))


def _split_options(text: str) -> list[str] | None:
    parts = _OPTION.split(" " + text.strip())
    letters, choices = parts[1::2], [p.strip() for p in parts[2::2]]
    if not letters or letters != list(LETTERS[: len(letters)]):
        return None
    return choices


def from_llava_entry(entry: dict, where: str) -> Instance:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry must be an object")
    if "id" not in entry:
        raise DataError(f"{where}: missing field 'id'")
    where = f"{where} (id {entry['id']!r})"
    if "conversations" not in entry:
        raise DataError(f"{where}: missing field 'conversations'")
    conv = entry["conversations"]
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(f"{where}: field 'conversations' needs a human and a gpt turn")
    for turn in conv[:2]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: each conversation turn needs 'from' and a string 'value'")
    if conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
        raise DataError(f"{where}: conversations must start with a 'human' then a 'gpt' turn")
    human, answer = conv[0]["value"], conv[1]["value"]
    image = entry.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"{where}: field 'image' must be a path string")
    if image and IMAGE_TAG not in human:
        raise DataError(f"{where}: has an image but no {IMAGE_TAG} in the first human turn")
    text = human.replace(IMAGE_TAG, "").strip()
    m = _CQM.match(text + "\n")
    choices = _split_options(m.group("options")) if m else None
    if m and choices:
        context = m.group("context").strip()
        inst = Instance(
            id=str(entry["id"]), question=m.group("question").strip(), choices=choices,
            answer=parse_answer(answer, len(choices)), image=image or None,
            context="" if context == "N/A" else context, source="llava",
        )
        if inst.answer is not None:
            rationale = answer.rsplit("The answer is", 1)[0].strip()
            inst.solution = rationale
    else:
        inst = Instance(id=str(entry["id"]), question=text, choices=[], answer=None,
                        image=image or None, source="llava", meta={"reference": answer})
    try:
        inst.validate(where)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return inst


def read_llava_json(path: str | Path, image_root: str | Path | None = None) -> list[Instance]:
    """Read a LLaVA instruction JSON file (a list of entries) or JSONL."""
    path = Path(path)
    text = read_text(path)
    try:
        if path.suffix == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of entries")
    if not entries:
        raise DataError(f"{path}: no entries")
    root = Path(image_root) if image_root is not None else path.parent
    out, seen = [], set()
    for i, entry in enumerate(entries):
        inst = from_llava_entry(entry, f"{path}, entry {i}")
        if inst.id in seen:
            raise DataError(f"{path}, entry {i}: duplicate id {inst.id!r}")
        seen.add(inst.id)
        if inst.image is not None:
            resolve_image(root, inst.image, f"{path}, entry {i} (id {inst.id!r})")
        out.append(inst)
    return out
