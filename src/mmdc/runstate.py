"""A run folder's record of itself, and what a resume must check before it trusts it.

``state.json`` lists the finished steps (a rerun skips them and reads their artifacts back),
the fingerprints of the model folders and adapters the run uses, and those of every file
each finished step wrote. A resume refuses, touching nothing, when the config
(:func:`check_resumable`) or a model (:meth:`RunState.check_models`) differs from what the
finished steps ran with, since their results would otherwise be mixed with the new ones,
and when ``state.json`` itself is damaged. A finished step whose files were damaged since
(truncated, emptied, overwritten, removed: :meth:`RunState.check_files`) is redone, in its
place in the run, and must give back the files it gave the first time, which the steps
after it used: every step is deterministic, so the resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from mmdc import artifacts
from mmdc.config import Config
from mmdc.data.pool import read_json, write_json
from mmdc.errors import ConfigError, DataError, MmdcError

log = logging.getLogger("mmdc.calibrate")

# files up to this size are hashed whole; larger ones (multi-GB weight shards) by their
# size and SAMPLES evenly spaced blocks, so that a resume of a 13B run starts in seconds
WHOLE_FILE = 64 << 20
SAMPLES, BLOCK = 16, 64 << 10


def file_fingerprint(path: Path) -> str:
    """``size:hash`` of a file's bytes (all of them, or evenly spaced blocks of a big one);
    independent of modification times, so a copied checkpoint is the same checkpoint."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= WHOLE_FILE:
            digest.update(f.read())
        else:
            for i in range(SAMPLES):
                f.seek((size - BLOCK) * i // (SAMPLES - 1))
                digest.update(f.read(BLOCK))
    return f"{size}:{digest.hexdigest()[:16]}"


def folder_fingerprint(folder: Path) -> dict[str, str]:
    """Every file of a checkpoint or adapter folder (hidden ones aside) -> its fingerprint."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))
    return {p.relative_to(folder).as_posix(): file_fingerprint(p) for p in files}


def model_fingerprints(cfg: Config) -> dict[str, dict]:
    """The fingerprints of every local model folder and adapter the config names (a served
    teacher, ``backend: openai``, has no folder here to check)."""
    from mmdc.config import ModelConfig
    from mmdc.models.load import resolve_model_path

    models = [("teacher", cfg.teacher), ("student", cfg.student)]
    if cfg.assess.referee == "judge" and cfg.assess.judge not in ("teacher", "student"):
        models.append(("assess.judge", ModelConfig(path=cfg.assess.judge)))
    out: dict[str, dict] = {}
    for name, m in models:
        if m.backend != "openai":
            out[name] = {"path": m.path, "files": folder_fingerprint(resolve_model_path(m.path))}
        if m.adapter:
            out[f"{name}.adapter"] = {"path": m.adapter,
                                      "files": folder_fingerprint(Path(m.adapter))}
    return out


def _what_changed(old: dict, new: dict) -> str:
    if old.get("path") != new.get("path"):
        return f"now {new.get('path')}, was {old.get('path')}"
    before, after = old.get("files", {}), new.get("files", {})
    parts = []
    for label, names in (("changed", [f for f in after if f in before and before[f] != after[f]]),
                         ("added", [f for f in after if f not in before]),
                         ("removed", [f for f in before if f not in after])):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{', '.join(sorted(names)[:3])}{more} {label}")
    return f"{new.get('path')}: {'; '.join(parts)}"


class RunFolderDamaged(MmdcError):
    """A run folder's record or a finished step's files cannot be trusted."""


# What no step's record covers: the record itself, what is rewritten at every start
# (config.yaml) or end (the report and its plots), the hold, and the caches and logs
# (journals and served answers check themselves; TensorBoard's are not read back).
UNRECORDED = (artifacts.STATE, artifacts.CONFIG, artifacts.REPORT_MD, artifacts.REPORT_JSON,
              ".mmdc.lock", "cache", "tensorboard", "eval")


def _scan(run_dir: Path) -> dict[str, tuple]:
    """Every recorded-kind file of the run folder -> (size, mtime, inode): what changed
    between two scans (an atomic rewrite always brings a new inode)."""
    out = {}
    for top, dirs, files in os.walk(run_dir):
        rel_top = Path(top).relative_to(run_dir)
        dirs[:] = [d for d in dirs if not d.startswith(".") and
                   (rel_top.parts or d not in UNRECORDED)]
        for name in files:
            rel = (rel_top / name).as_posix()
            if name.startswith(".") or (not rel_top.parts and (
                    name in UNRECORDED or name.endswith(".png"))):
                continue
            st = os.stat(Path(top) / name)
            out[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _read_state(path: Path) -> dict:
    """``state.json``, checked for its shape; damaged, it is a one-line refusal."""
    try:
        saved = read_json(path)
        problem = ("'done' is not a list of step names" if not isinstance(
            saved.get("done"), list) or not all(isinstance(s, str) for s in saved["done"])
            else "'models' is not an object" if not isinstance(saved.get("models", {}), dict)
            else "'files' is not an object of objects" if not isinstance(
                saved.get("files", {}), dict) or not all(
                isinstance(v, dict) for v in saved.get("files", {}).values())
            else None)
    except DataError as exc:
        problem = str(exc).removeprefix(f"{path}: ")
    if problem:
        raise RunFolderDamaged(
            f"{path}: damaged ({problem}); it lists the run's finished steps, so the run "
            f"cannot go on from this folder: start afresh with another run_dir (or delete "
            f"{path.parent})")
    return saved


class RunState:
    """The finished steps of a run folder (``state.json``), the model fingerprints they
    ran with and the files each wrote."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / artifacts.STATE
        self.done: list[str] = []
        self.models: dict = {}
        self.files: dict[str, dict[str, str]] = {}  # step -> its files' fingerprints
        self.redo: set[str] = set()  # finished steps whose files were damaged since
        self._seen: dict | None = None
        if self.path.is_file():
            saved = _read_state(self.path)
            self.done, self.models = saved["done"], saved.get("models", {})
            self.files = saved.get("files", {})
        self.clock = time.monotonic()

    def watch(self) -> None:
        """Note the folder's files now: what changes from here on is the next step's."""
        self._seen = _scan(self.run_dir)

    def check_files(self) -> dict[str, list[str]]:
        """The finished steps whose recorded files are damaged or gone, with how."""
        damaged: dict[str, list[str]] = {}
        for step in self.done:
            for rel, want in sorted(self.files.get(step, {}).items()):
                path = self.run_dir / rel
                have = file_fingerprint(path) if path.is_file() else None
                if have != want:
                    size = want.split(":")[0]
                    how = ("gone" if have is None else f"{have.split(':')[0]} bytes, was "
                           f"{size}" if have.split(":")[0] != size else "its bytes changed")
                    damaged.setdefault(step, []).append(f"{path} ({how})")
        return damaged

    def redo_damaged(self, damaged: dict[str, list[str]], main: bool) -> None:
        """Mark the damaged steps to be redone in their place (the damaged files removed,
        so that no step reads them back as a cache)."""
        for step, what in damaged.items():
            log.warning("%s: damaged since %s wrote it: %s is redone (the steps after it "
                        "keep their results)", "; ".join(what), step, step)
            if main:
                for rel, want in self.files[step].items():
                    path = self.run_dir / rel
                    if path.is_file() and file_fingerprint(path) != want:
                        path.unlink()
        self.redo = set(damaged)

    def _record(self, step: str) -> None:
        """The files that changed since the last look are ``step``'s (a file rewritten by
        a later step is that step's). A redone step must give back its first files when
        steps after it used them."""
        now = _scan(self.run_dir)
        seen = self._seen if self._seen is not None else {}
        new = {rel: file_fingerprint(self.run_dir / rel) for rel, st in sorted(now.items())
               if seen.get(rel) != st}
        self._seen = now
        first = dict(self.files.get(step, {}))
        for files in self.files.values():
            for rel in new:
                files.pop(rel, None)
        if step in self.redo and first:
            differ = sorted(rel for rel in new if first.get(rel) != new[rel])
            later = self.done[self.done.index(step) + 1:]
            if differ and later:
                raise RunFolderDamaged(
                    f"{self.run_dir}: {step} was redone for its damaged files but gave other "
                    f"ones ({', '.join(differ[:3])}) than those the steps after it "
                    f"({later[0]}, ...) used; start afresh with another run_dir")
            new = {**first, **new}
        self.files[step] = new

    def check_models(self, models: dict) -> None:
        """Refuse (touching nothing) when a model or adapter the finished steps used has
        changed since; then remember ``models`` for the steps to come."""
        if self.done and self.models:
            for name in sorted(set(self.models) | set(models)):
                if self.models.get(name) != models.get(name):
                    what = (_what_changed(self.models[name], models[name])
                            if name in self.models and name in models else
                            "now used" if name in models else "no longer used")
                    raise ConfigError(
                        f"{self.path.parent}: the {name} model changed since this run's "
                        f"finished steps used it ({what}); their results would be mixed "
                        f"with the new model's: start afresh in a new run_dir (or delete "
                        f"{self.path.parent})")
        self.models = models

    def __contains__(self, step: str) -> bool:
        return step in self.done and step not in self.redo

    def mark(self, step: str, summary: str = "") -> None:
        """Record a finished step and say in one line what it did. Under several processes
        rank 0 writes the file and every rank waits here, so what rank 0 wrote for the step
        is there for all to read. The step's generation journal is no longer needed once
        its results are written."""
        from mmdc import distributed
        from mmdc.faults import maybe_fail

        if distributed.is_main():
            self._record(step)
        if step in self.redo:  # in its place among the finished steps
            self.redo.discard(step)
        else:
            self.done.append(step)
        if distributed.is_main():
            write_json(self.path, {"done": self.done, "last": self.done[-1], "models": self.models,
                                   "files": self.files})
            took = time.monotonic() - self.clock
            log.info("%s done%s (%.0f s)", step, f": {summary}" if summary else "", took)
            from mmdc.journal import journal_path

            journal = journal_path(self.path.parent, step)
            journal.unlink(missing_ok=True)
            if journal.parent.is_dir() and not any(journal.parent.iterdir()):
                journal.parent.rmdir()
        distributed.barrier()
        self.clock = time.monotonic()
        maybe_fail(f"after:{step}")


# Keys that no finished step depends on: a resume may change them (add iterations, say;
# or point at the teacher's server where it now runs).
RESUME_SAFE_KEYS = ("run_dir", "loop.iterations", "eval.batch_size", "teacher.endpoint",
                    "teacher.api_key_env", "teacher.concurrency", "teacher.timeout",
                    "teacher.max_retries")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def changed_keys(old: dict, new: Config) -> list[str]:
    """Dotted config keys whose value differs between a saved config and ``new``; a key
    the saved config lacks (written by an older mmdc) counts at its default."""
    from mmdc.schema import upgrade

    before = _flatten(Config().model_dump(mode="json"))
    before.update(_flatten(upgrade(old)))
    after = _flatten(new.model_dump(mode="json"))
    return sorted(k for k in before.keys() | after.keys()
                  if before.get(k) != after.get(k)
                  and not any(k == s or k.startswith(s + ".") for s in RESUME_SAFE_KEYS))


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run folder whose finished steps ran with another config."""
    import yaml

    saved = run_dir / artifacts.CONFIG
    if not RunState(run_dir).done or not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{saved}: unreadable ({exc}); cannot check it before resuming") from None
    changed = changed_keys(old, cfg)
    if changed:
        raise ConfigError(
            f"{run_dir}: the config differs from the one its finished steps ran with "
            f"({', '.join(changed)}); use a new run_dir, or set these back to resume")
