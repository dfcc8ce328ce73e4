"""JSONL instance pools and atomic file writes.

A pool is one record per line (:class:`~mmdc.data.record.Instance` as JSON). Every write
goes to a temporary file in the same folder and is renamed into place, so a crash never
leaves a half-written pool behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mmdc.data.record import Instance
from mmdc.errors import DataError, MmdcError

log = logging.getLogger(__name__)


def ensure_dir(path: str | Path, what: str) -> Path:
    """Create the output folder ``path`` (named ``what`` in errors: a config key or an
    option) or say in one line why it cannot be: a file stands there or above it, or it
    is not writable."""
    path = Path(path)
    for above in (path, *path.parents):
        if above.exists() and not above.is_dir():
            where = "is" if above == path else f"is under {above}, which is"
            raise MmdcError(f"{what} {path} {where} a file, not a folder; choose another "
                            f"{what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MmdcError(f"{what} {path}: cannot create the folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise MmdcError(f"{what} {path}: the folder is not writable")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_dir_atomic(path: str | Path, save) -> Path:
    """Build a folder with ``save(tmp_dir)`` beside ``path``, then swap it in: a crash
    leaves either the old folder or the new one, never a half-written one."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row to an append-only JSONL file and flush it; a crash mid-write leaves
    a torn last line, which :func:`read_jsonl` drops with a warning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


def write_json(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return write_text_atomic(path, text)


def write_pool(path: str | Path, instances: Iterable[Instance]) -> Path:
    return write_jsonl(path, (inst.to_dict() for inst in instances))


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; missing or not UTF-8 is a :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def read_json(path: str | Path, expect: type | None = dict):
    """Read a JSON file; a missing, empty, non-UTF-8 or malformed file, or one whose top
    level is not ``expect``, is a :class:`DataError` naming the file and the problem."""
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc.msg}, line {exc.lineno})") from None
    if expect is not None and not isinstance(obj, expect):
        kinds = {dict: "an object", list: "a list"}
        raise DataError(f"{path}: expected {kinds.get(expect, expect.__name__)} at the top "
                        f"level, got {type(obj).__name__}")
    return obj


def read_jsonl(path: str | Path, skip_bad: bool = False) -> list[dict]:
    """Read a JSONL file. A malformed line is an error naming the file and line, except a
    *partial last line* (malformed and not newline-terminated, as a crash mid-append leaves
    it), which is dropped with a warning so that a resumed run can go on. ``skip_bad``:
    every malformed line is dropped with one warning (a cache that can do without it)."""
    path = Path(path)
    rows = []
    text = read_text(path)
    lines = text.splitlines()
    bad = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if skip_bad:
                bad.append(n)
                continue
            if n == len(lines) and not text.endswith("\n"):
                log.warning("%s, line %d: dropping a partial last line (%d bytes; %s), as a "
                            "crash during a write leaves it", path, n, len(line), exc.msg)
                break
            raise DataError(f"{path}, line {n}: malformed JSON ({exc.msg})") from None
    if bad:
        log.warning("%s: dropping %d malformed line(s) (line %s%s)", path, len(bad), bad[0],
                    " and more" if len(bad) > 1 else "")
    return rows


def read_pool(path: str | Path) -> list[Instance]:
    """Read and validate a JSONL pool; errors name the file, line and instance id."""
    out, seen = [], set()
    for n, row in enumerate(read_jsonl(path), 1):
        where = f"{path}, record {n}"
        if isinstance(row, dict) and "id" in row:
            where += f" (id {row['id']!r})"
        try:
            inst = Instance.from_dict(row, where)
        except (TypeError, ValueError) as exc:
            raise DataError(str(exc)) from None
        if inst.id in seen:
            raise DataError(f"{where}: duplicate id {inst.id!r}")
        seen.add(inst.id)
        out.append(inst)
    return out
