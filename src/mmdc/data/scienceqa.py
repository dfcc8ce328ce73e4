"""ScienceQA readers and writer.

* Official layout: ``problems.json`` (keyed by problem id), ``pid_splits.json`` and
  ``images/<split>/<pid>/image.png``.
* Hugging Face column layout (``derek-thomas/ScienceQA`` style): a ``datasets``
  ``save_to_disk`` folder or parquet files, with an ``image`` column. Embedded images are
  written once to an image folder so records can reference them by path.

Text-only problems (``image: null``) and empty hints are normal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from mmdc.data.images import MAX_IMAGE_PIXELS, open_checked, resolve_image
from mmdc.data.pool import write_json
from mmdc.data.record import Instance
from mmdc.errors import DataError

SPLIT_ALIASES = {"validation": "val"}


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _grade(value, where: str) -> int | None:
    if value in (None, ""):
        return None
    text = str(value).lower().removeprefix("grade")
    try:
        grade = int(text)
    except ValueError:
        raise DataError(f"{where}: field 'grade' = {value!r} is not like 'grade5'") from None
    if not 1 <= grade <= 12:
        raise DataError(f"{where}: field 'grade' = {value!r} is not in grade1..grade12")
    return grade


def problem_to_instance(pid: str, prob: dict, split: str, where: str) -> Instance:
    if not isinstance(prob, dict):
        raise DataError(f"{where}: problem must be an object")
    for key in ("question", "choices", "answer"):
        if key not in prob:
            raise DataError(f"{where}: missing field '{key}'")
    meta = {k: v for k, v in prob.items() if k in ("task", "scene")}
    fields = dict(
        id=str(pid), question=prob["question"], choices=prob["choices"], answer=prob["answer"],
        image=None, context=prob.get("hint") or "", lecture=prob.get("lecture") or "",
        solution=prob.get("solution") or "", subject=prob.get("subject") or "",
        grade=_grade(prob.get("grade"), where), topic=prob.get("topic") or "",
        category=prob.get("category") or "", skill=prob.get("skill") or "",
        split=prob.get("split") or split, source=prob.get("source") or "scienceqa",
        iteration=prob.get("iteration"), meta=meta,
    )
    inst = Instance(**fields)
    try:
        inst.validate(where)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return inst


def read_scienceqa(root: str | Path, split: str, check_images: bool = True) -> list[Instance]:
    """Read one split of a ScienceQA folder in the official layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    problems_path = root / "problems.json"
    problems = _read_json(problems_path)
    if not isinstance(problems, dict):
        raise DataError(f"{problems_path}: expected an object keyed by problem id")
    splits_path = root / "pid_splits.json"
    if splits_path.is_file():
        splits = _read_json(splits_path)
        if not isinstance(splits, dict):
            raise DataError(f"{splits_path}: expected an object of split name -> ids")
        split = SPLIT_ALIASES.get(split, split) if split not in splits else split
        if split not in splits:
            raise DataError(f"{splits_path}: no split {split!r} "
                            f"(available: {', '.join(sorted(splits))})")
        pids = [str(p) for p in splits[split]]
    else:
        pids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]
    if not pids:
        raise DataError(f"{splits_path if splits_path.is_file() else problems_path}: "
                        f"split {split!r} is empty")
    out = []
    for pid in pids:
        where = f"{problems_path} (problem {pid})"
        if pid not in problems:
            raise DataError(f"{splits_path}: split {split!r} lists problem {pid} "
                            f"that {problems_path.name} does not have")
        prob = problems[pid]
        inst = problem_to_instance(pid, prob, split, where)
        image_name = prob.get("image")
        if image_name:
            if not isinstance(image_name, str):
                raise DataError(f"{where}: field 'image' must be a file name or null")
            img_split = prob.get("split") or split
            rel = f"images/{img_split}/{pid}/{image_name}"
            path = resolve_image(root, rel, where)
            if check_images and not path.is_file():
                raise DataError(f"{where}: image file not found: {path}")
            inst.image = rel
        out.append(inst)
    return out


def write_scienceqa(root: str | Path,
                    splits: dict[str, Iterable[tuple[Instance, Image.Image | None]]]) -> Path:
    """Write instances (with their images) in the official ScienceQA layout."""
    root = Path(root)
    problems: dict[str, dict] = {}
    pid_splits: dict[str, list[str]] = {}
    for split, items in splits.items():
        pid_splits[split] = []
        for inst, image in items:
            prob = {
                "question": inst.question, "choices": inst.choices, "answer": inst.answer,
                "hint": inst.context, "image": "image.png" if image is not None else None,
                "task": "closed choice", "grade": f"grade{inst.grade}" if inst.grade else "",
                "subject": inst.subject, "topic": inst.topic, "category": inst.category,
                "skill": inst.skill, "lecture": inst.lecture, "solution": inst.solution,
                "split": split,
            }
            if inst.source != "scienceqa":
                prob["source"] = inst.source
            if "scene" in inst.meta:
                prob["scene"] = inst.meta["scene"]
            if image is not None:
                folder = root / "images" / split / inst.id
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / "image.png")
            problems[inst.id] = prob
            pid_splits[split].append(inst.id)
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", pid_splits)
    return root


# ------------------------------------------------------------ Hugging Face columns


def _load_hf(path: Path, split: str):
    import datasets

    if not path.exists():
        raise DataError(f"{path}: dataset not found")
    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            names = [split, {"val": "validation"}.get(split, split)]
            for name in names:
                if name in ds:
                    return ds[name]
            raise DataError(f"{path}: no split {split!r} (available: {', '.join(ds)})")
        return ds
    files = sorted(path.glob(f"**/{split}-*.parquet")) or sorted(
        path.glob(f"**/{ {'val': 'validation'}.get(split, split)}-*.parquet"))
    if not files:
        raise DataError(f"{path}: no datasets folder or parquet files for split {split!r}")
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def read_scienceqa_hf(path: str | Path, split: str, image_dir: str | Path,
                      max_pixels: int | None = MAX_IMAGE_PIXELS) -> list[Instance]:
    """Read the Hugging Face column layout; embedded images are saved under
    ``image_dir/<split>/<row>.png`` (once) and referenced relative to ``image_dir``; one
    with more than ``max_pixels`` pixels is refused before it is decoded."""
    path, image_dir = Path(path), Path(image_dir)
    ds = _load_hf(path, split)
    if len(ds) == 0:
        raise DataError(f"{path}: split {split!r} is empty")
    missing = [c for c in ("question", "choices", "answer") if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    out = []
    for i, row in enumerate(ds):
        pid = str(row.get("id") or row.get("pid") or f"{split}-{i}")
        where = f"{path} (split {split}, row {i})"
        image = row.pop("image", None)
        inst = problem_to_instance(pid, row, split, where)
        if image is not None:
            rel = f"{split}/{hashlib.sha1(pid.encode()).hexdigest()[:12]}-{i}.png"
            target = image_dir / rel
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(image, dict):  # undecoded {"bytes", "path"}
                    import io
                    image = open_checked(io.BytesIO(image["bytes"]), f"{where}: image",
                                         max_pixels)
                image.convert("RGB").save(target)
            inst.image = rel
        out.append(inst)
    return out
