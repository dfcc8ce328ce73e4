"""One typed config tree, loaded from YAML with ``key=value`` overrides.

The built-in default *is* the models' defaults: ``Config()`` describes the embedded
synthetic task with the toy teacher and student, and ``configs/default.yaml`` is its YAML
dump (a test keeps the two equal). Unknown keys, wrong types and bad values are
:class:`~mmdc.errors.ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmdc import artifacts
from mmdc.data.images import MAX_IMAGE_PIXELS
from mmdc.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Section):
    """Sizes of the built-in synthetic task's splits (used when data.format is synthetic)."""

    seed: int = 0
    pretrain: int = Field(2000, ge=0)
    train: int = Field(400, ge=1)
    pool: int = Field(600, ge=0)
    val: int = Field(200, ge=1)
    test: int = Field(400, ge=1)


class DataConfig(_Section):
    format: Literal["synthetic", "scienceqa", "scienceqa_hf", "llava"] = "synthetic"
    root: str = "data/synthetic"  # dataset folder (a file for llava)
    image_root: str | None = None  # llava: folder that image paths are relative to
    seed_split: str = "train"  # the labelled instruction set
    probe_split: str = "val"  # assessment
    test_split: str = "test"  # held-out evaluation
    pool: str | None = "pool"  # unlabelled images for generation
    # an image with more pixels (width x height) is refused by its header, before it is
    # decoded (a decompression bomb: a few KB on disk, gigabytes in memory); null: no limit
    max_image_pixels: int | None = Field(MAX_IMAGE_PIXELS, ge=1)
    synth: SynthConfig = SynthConfig()


class ModelConfig(_Section):
    path: str  # a local save_pretrained folder, or builtin:teacher / builtin:student
    adapter: str | None = None  # a PEFT adapter folder to apply on top
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    # the hf backend's KV cache: dynamic, or static (fixed shapes, compiled decoding on
    # CUDA; no faster on a CPU). Greedy outputs are the same
    cache: Literal["dynamic", "static"] = "dynamic"
    # how the model generates: hf (in-process transformers), openai (any OpenAI-compatible
    # chat-completions server: vLLM, SGLang, TGI, `mmdc serve`, hosted APIs) or vllm
    # (offline vllm.LLM, GPU, `pip install mmdc[vllm]`). Only the teacher (and a judge) may
    # use openai/vllm: the student is trained in-process.
    backend: Literal["hf", "openai", "vllm"] = "hf"
    endpoint: str | None = None  # openai: the base URL, e.g. http://127.0.0.1:8000/v1
    served_name: str | None = None  # openai: the model name on the server (default: path)
    api_key_env: str | None = None  # openai: the environment variable holding the API key
    concurrency: int = Field(8, ge=1)  # openai: requests in flight
    timeout: float = Field(120.0, gt=0)  # openai: seconds per request
    max_retries: int = Field(5, ge=0)  # openai: retries (with backoff) on 429/5xx/timeouts


class EvalConfig(_Section):
    prompt: Literal["CQM-A", "CQM-LEA"] = "CQM-A"
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)  # evaluate the first N instances only


class LoraConfigSection(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # a regex on module paths: the language model's linear layers only (not the CLIP tower)
    target_pattern: str = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|"
                           r"up_proj|down_proj)")


class TrainConfig(_Section):
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(200, ge=1)
    warmup_steps: int = Field(20, ge=0)
    # tokens per training row; unset: the longest row of the data (image tokens included)
    max_length: int | None = Field(None, ge=16)
    logging_steps: int = Field(10, ge=1)
    # recompute activations in the backward pass: saves memory on large models, costs a
    # third more compute (TRL turns it on by default; off here unless a config asks)
    gradient_checkpointing: bool = False


class AlignConfig(_Section):
    """Stage 1: LoRA alignment on the seed instruction set."""

    roles: list[Literal["teacher", "student"]] = ["student"]
    # the seed split's gold answers as letters (CQM-A: the toy student's task format) or
    # with the lecture and solution (CQM-LEA: the real configs, as LLaVA's recipe)
    prompt: Literal["CQM-A", "CQM-LEA"] = "CQM-A"
    lora: LoraConfigSection = LoraConfigSection()
    train: TrainConfig = TrainConfig(max_steps=100)


class ImitateConfig(_Section):
    """Sequence-level distillation: the student learns the teacher's answers."""

    max_new_tokens: int = Field(64, ge=1)  # teacher answer length
    # the formats the student learns the teacher's answers in: CQM-LEA (the teacher's
    # lecture, solution and answer) and/or CQM-A (the teacher's answer letter alone)
    formats: list[Literal["CQM-A", "CQM-LEA"]] = Field(default_factory=lambda: ["CQM-A"],
                                                        min_length=1)
    # how many times each generated instance's rows appear in the imitation data (the seed
    # split's once): >1 puts the weight of training on what the calibration found missing
    generated_weight: int = Field(8, ge=1)
    train: TrainConfig = TrainConfig(max_steps=200)
    # optional token-level distillation on top of the sequence-level loss (needs a shared
    # vocabulary): generalised JSD, beta 0 = forward KL, 1 = reverse KL
    kd: Literal["none", "forward_kl", "reverse_kl", "jsd"] = "none"
    kd_beta: float = Field(0.5, ge=0.0, le=1.0)  # used by kd=jsd
    kd_temperature: float = Field(1.0, gt=0.0)
    kd_weight: float = Field(0.5, ge=0.0, le=1.0)  # loss = (1-w) CE + w KD


class GenerateConfig(_Section):
    per_iteration: int = Field(192, ge=1)  # seeds asked per iteration
    # the share of the seeds drawn from the hard probes (the rest from the easy ones, asked
    # for a harder question); on the built-in task every seed hard, with by_yield, measured
    # best (README, "Calibration gain")
    hard_share: float = Field(1.0, ge=0.0, le=1.0)
    k: int = Field(5, ge=1)  # sampled teacher answers for self-consistency
    # minimum agreement of the k + 1 votes (written label and k samples) to keep an
    # instance: 0.9 with k=5 asks all six to agree (the toy teacher's letters are sharp:
    # a disagreement marks a suspect instance); the real configs use 0.6
    tau: float = Field(0.9, ge=0.0, le=1.0)
    # whether the label the teacher wrote counts as one of the votes (false: the k
    # samples alone decide, and a written label they overrule is replaced)
    written_vote: bool = True
    rouge_threshold: float = Field(0.7, ge=0.0, le=1.0)
    # drop instances the student already answers like the teacher (targeted strategy only),
    # judged per instance or per kind (the instances written for one seed skill and mode,
    # dropped together when the student answers at least `mastery` of them like the
    # teacher: judged one by one, a student that guesses keeps only its wrong guesses and
    # learns the other answer's bias)
    challenge: bool = True
    challenge_by: Literal["instance", "kind"] = "kind"
    mastery: float = Field(0.9, ge=0.0, le=1.0)
    # hard seeds of a skill drawn in proportion to the share of the teacher's earlier
    # writing for that skill it could verify (targeted strategy, from the second iteration)
    by_yield: bool = True
    # rounds of writing more when the challenge filter leaves an iteration short of
    # max_accepted: the teacher writes again from the seeds whose instances were kept
    # (twice the missing count). Off by default: on the built-in task it filled the
    # targeted arm's third iteration without lifting the student (README)
    refill: int = Field(0, ge=0)
    temperature: float = Field(0.7, ge=0.0)  # 0: greedy (the k answers are then one)
    # the format of the teacher's k verifying answers: its rationales (CQM-LEA) or the
    # letter alone (CQM-A). The toy teacher answers 99.75% in CQM-A but 91% in CQM-LEA
    # (spatial 54, alphabet 76): its letters are the better labels
    verify_prompt: Literal["CQM-A", "CQM-LEA"] = "CQM-A"
    max_new_tokens: int = Field(128, ge=8)
    # keep at most this many accepted instances per iteration (0: no limit); the rest are
    # dropped as over_budget. Comparing strategies at an equal generation budget uses it.
    max_accepted: int = Field(96, ge=0)
    # the pool image each seed's new instance is written on: "similar", one from the tenth
    # of the free images that look most like the seed's image in the student's (frozen)
    # vision tower, so that it can carry the seed's skill (a magnet question needs magnets,
    # and magnet pictures are as rare in the pool as in the seed split; the few nearest
    # would repeat the seed's answer), or "random", any free image
    pair_images: Literal["random", "similar"] = "similar"


class AssessConfig(_Section):
    """Which referee marks probe instances hard (the student falls short of the teacher)."""

    referee: Literal["agreement", "likelihood", "judge"] = "agreement"
    likelihood_threshold: float = Field(0.5, ge=0.0, le=1.0)  # hard below this probability
    judge: str = "teacher"  # judge model for referee=judge: teacher, student or a folder
    judge_threshold: float = Field(1.0, ge=0.0)  # hard when teacher - student >= this
    judge_retries: int = Field(2, ge=0)


class LoopConfig(_Section):
    iterations: int = Field(3, ge=0)
    # targeted: seeds from what the assessment found hard (and the challenge filter);
    # random: seeds drawn from the instruction pool, nothing about the student used (the
    # ablation of Lion without its referee); none: plain distillation on the seed split
    strategy: Literal["targeted", "random", "none"] = "targeted"
    retrain: Literal["continue", "reset"] = "continue"
    # the self-improving teacher (mmdc.stages.improve), label-free: it finds where its own
    # letter and rationale disagree on the probes, writes instances there, labels them by
    # the majority of its sampled rationales and learns its letters on those labels,
    # replaying seed-split instances it answers consistently (off: the teacher as given)
    self_improve: bool = True
    teacher_seeds: int = Field(64, ge=0)  # seeds per iteration for the teacher's weak spots
    # the format of the k answers whose majority labels the teacher's own instances (its
    # written label votes too, as in generate.written_vote), and the share that must agree
    teacher_verify_prompt: Literal["CQM-A", "CQM-LEA"] = "CQM-LEA"
    teacher_tau: float = Field(0.9, ge=0.0, le=1.0)
    # seed-split instances where its letter and rationale agree, replayed with that shared
    # answer (never the split's label) in each update
    teacher_replay: int = Field(256, ge=0)
    # the teacher's LoRA update on its own labelled instances and the replay
    teacher_train: TrainConfig = TrainConfig(max_steps=100, learning_rate=5e-4)


class Config(_Section):
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: ModelConfig = ModelConfig(path="builtin:teacher")
    student: ModelConfig = ModelConfig(path="builtin:student")
    eval: EvalConfig = EvalConfig()
    align: AlignConfig = AlignConfig()
    imitate: ImitateConfig = ImitateConfig()
    assess: AssessConfig = AssessConfig()
    generate: GenerateConfig = GenerateConfig()
    loop: LoopConfig = LoopConfig()


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
        cfg = Config.model_validate(_merge(Config().model_dump(), data))
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
    ``loop.self_improve=false``."""
    if cfg.loop.self_improve and cfg.teacher.backend != "hf":
        raise ConfigError(f"{source}: key 'teacher.backend': {cfg.teacher.backend} serves "
                          "generations only, but loop.self_improve=true (the default) needs "
                          "the teacher's weights in-process (use backend hf, or "
                          "loop.self_improve=false for a teacher as given)")


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
