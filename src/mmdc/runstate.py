"""A run folder's record of itself, and what a resume must check before it trusts it.

``state.json`` lists the finished steps (a rerun skips them and reads their artifacts back)
and the fingerprints of the model folders and adapters the run uses: a resume refuses,
touching nothing, when the config (:func:`check_resumable`) or a model
(:meth:`RunState.check_models`) differs from what the finished steps ran with, since their
results would otherwise be mixed with the new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from mmdc.config import Config
from mmdc.data.pool import write_json
from mmdc.errors import ConfigError

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


class RunState:
    """The finished steps of a run folder (``state.json``) and the model fingerprints they
    ran with."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "state.json"
        self.done: list[str] = []
        self.models: dict = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            self.done, self.models = saved["done"], saved.get("models", {})
        self.clock = time.monotonic()

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
        return step in self.done

    def mark(self, step: str, summary: str = "") -> None:
        """Record a finished step and say in one line what it did. Under several processes
        rank 0 writes the file and every rank waits here, so what rank 0 wrote for the step
        is there for all to read. The step's generation journal is no longer needed once
        its results are written."""
        from mmdc import distributed
        from mmdc.faults import maybe_fail

        self.done.append(step)
        if distributed.is_main():
            write_json(self.path, {"done": self.done, "last": step, "models": self.models})
            took = time.monotonic() - self.clock
            log.info("%s done%s (%.0f s)", step, f": {summary}" if summary else "", took)
            journal = journal_path(self.path.parent, step)
            journal.unlink(missing_ok=True)
            if journal.parent.is_dir() and not any(journal.parent.iterdir()):
                journal.parent.rmdir()
        distributed.barrier()
        self.clock = time.monotonic()
        maybe_fail(f"after:{step}")


def journal_path(run_dir: Path, step: str) -> Path:
    """Where a step checkpoints its in-process generation, batch by batch."""
    return run_dir / "cache" / (step.replace("/", "-") + ".journal.jsonl")


def _journaled(generator, run_dir: Path, step: str, who: str):
    from mmdc.models.backends import Journaled

    return Journaled(generator, journal_path(run_dir, step), f"{step}:{who}")


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
    before = _flatten(Config().model_dump(mode="json"))
    before.update(_flatten(old))
    after = _flatten(new.model_dump(mode="json"))
    return sorted(k for k in before.keys() | after.keys()
                  if before.get(k) != after.get(k)
                  and not any(k == s or k.startswith(s + ".") for s in RESUME_SAFE_KEYS))


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run folder whose finished steps ran with another config."""
    import yaml

    saved = run_dir / "config.yaml"
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
