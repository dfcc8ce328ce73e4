"""One typed config tree, loaded from YAML with ``key=value`` overrides.

The sections and their defaults are in :mod:`mmdc.schema`. The built-in default *is*
the models' defaults: ``Config()`` describes the embedded
synthetic task with the toy teacher and student, and ``configs/default.yaml`` is its YAML
dump (a test keeps the two equal). Unknown keys, wrong types and bad values are
:class:`~mmdc.errors.ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mmdc import artifacts
from mmdc.errors import ConfigError
from mmdc.schema import (  # noqa: F401 - the sections are part of this module's API
    AlignConfig,
    AssessConfig,
    Config,
    DataConfig,
    EvalConfig,
    GenerateConfig,
    ImitateConfig,
    ImproveConfig,
    LoopConfig,
    LoraConfigSection,
    ModelConfig,
    SynthConfig,
    TrainConfig,
    VerifyConfig,
    upgrade,
)

# ------------------------------------------------------------------------- loading


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives the same key twice (PyYAML would keep the last silently)."""


def _check_duplicates(node, path: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            name = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"key '{name}' is given twice (lines {seen[key]} and "
                                        f"{line}); keep one")
            seen[key] = line
            _check_duplicates(value_node, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]")


def load_yaml(text: str):
    """Parse YAML text as ``yaml.safe_load`` does, but refuse a key given twice in one
    mapping (PyYAML keeps the last one silently: a typo then changes a run without a
    word)."""
    _check_duplicates(yaml.compose(text, Loader=yaml.SafeLoader))
    return yaml.safe_load(text)


def _describe(loc: tuple, model: type[BaseModel]) -> str:
    """List the keys allowed at the parent of ``loc``."""
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type)
                                 and issubclass(field.annotation, BaseModel)):
            return ""
        cls = field.annotation
    return ", ".join(cls.model_fields)


def _raise_from(err: ValidationError, source: str) -> None:
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    e = errors[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        allowed = _describe(e["loc"], Config)
        msg = f"unknown key '{key}'" + (f" (allowed: {allowed})" if allowed else "")
    else:
        msg = f"key '{key}': {e['msg']}"
        if "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
    more = len(err.errors()) - 1
    if more:
        msg += f" [and {more} more problem{'s' if more > 1 else ''}]"
    raise ConfigError(f"{source}: {msg}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value (e.g. eval.batch_size=16)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _merge(base: dict, data: dict) -> dict:
    """Deep-merge the user's keys onto the defaults, so a section can be given in part."""
    out = dict(base)
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (or the built-in default when ``path`` is None) and apply
    ``key=value`` overrides."""
    data: dict = {}
    source = "built-in default config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            import re

            if not path.exists() and re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", str(path)) and \
                    path.suffix not in (".yaml", ".yml", ".json"):
                raise ConfigError(f"{path}: neither a config file nor an override; overrides "
                                  f"are key=value (e.g. {path}=VALUE)")
            if path.is_dir():
                raise ConfigError(f"{path}: a folder, not a config file")
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8"))
        except DuplicateKeyError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
        if loaded is None:
            raise ConfigError(f"{path}: the config file is empty (no keys); leave it out to "
                              "run the built-in default")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, "
                              f"got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with overrides)"
    try:
        cfg = Config.model_validate(_merge(Config().model_dump(), upgrade(data)))
    except ValidationError as err:
        _raise_from(err, source)
        raise  # unreachable
    check_consistent(cfg, source)
    return cfg


def check_consistent(cfg: Config, source: str = "config") -> None:
    """Combinations of keys that cannot work together, each named."""
    if cfg.student.backend != "hf":
        raise ConfigError(f"{source}: key 'student.backend': the student is trained "
                          f"in-process and must use backend hf (got {cfg.student.backend!r})")
    m = cfg.teacher
    if m.backend == "openai" and not m.endpoint:
        raise ConfigError(f"{source}: key 'teacher.endpoint': backend openai needs the "
                          "server's base URL (e.g. http://127.0.0.1:8000/v1)")
    if m.backend != "hf":
        needs_weights = []
        if "teacher" in cfg.align.roles:
            needs_weights.append("align.roles contains teacher")
        if cfg.imitate.kd != "none":
            needs_weights.append(f"imitate.kd={cfg.imitate.kd}")
        if m.adapter:
            needs_weights.append("teacher.adapter is set (serve the adapter instead: "
                                 "mmdc serve PATH --adapter DIR)")
        if needs_weights:
            raise ConfigError(f"{source}: key 'teacher.backend': {m.backend} serves "
                              f"generations only, but {'; '.join(needs_weights)} needs the "
                              "teacher's weights in-process (use backend hf)")


def check_loop_teacher(cfg: Config, source: str = "config") -> None:
    """The calibration loop's self-improving teacher (the default) learns, so it needs its
    weights in-process; a served teacher can still be evaluated, or used with
    ``improve.enabled=false``."""
    if cfg.improve.enabled and cfg.teacher.backend != "hf":
        raise ConfigError(f"{source}: key 'teacher.backend': {cfg.teacher.backend} serves "
                          "generations only, but improve.enabled=true (the default) needs "
                          "the teacher's weights in-process (use backend hf, or "
                          "improve.enabled=false for a teacher as given)")


def secret_from_env(var: str, key: str) -> str:
    """A secret (API key, server token) from the environment variable ``var`` that the
    config key or option ``key`` names; secrets never live in configs or run folders."""
    import os

    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"{key}: the environment variable {var} is not set")
    return value


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config into a run folder."""
    from mmdc.data.pool import write_text_atomic

    out = Path(run_dir) / artifacts.CONFIG
    write_text_atomic(out, config_to_yaml(cfg))
    return out
