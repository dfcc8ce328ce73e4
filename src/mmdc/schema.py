"""The config tree's sections, one per paper step (data, models, eval, align, assess,
generate, imitate, the self-improving teacher, the loop), with their defaults: ``Config()``
is the built-in default. Loading and checking: :mod:`mmdc.config`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mmdc.data.images import MAX_IMAGE_PIXELS

# keys an earlier mmdc wrote, and where they live now: old configs, overrides and run
# folders still load
RENAMED = {
    "loop.self_improve": "improve.enabled",
    "loop.teacher_seeds": "improve.seeds",
    "loop.teacher_verify_prompt": "improve.verify_prompt",
    "loop.teacher_tau": "improve.tau",
    "loop.teacher_replay": "improve.replay",
    "loop.teacher_train": "improve.train",
    "generate.k": "verify.k",
    "generate.tau": "verify.tau",
    "generate.written_vote": "verify.written_vote",
    "generate.verify_prompt": "verify.prompt",
    "generate.challenge": "verify.challenge",
    "generate.challenge_by": "verify.challenge_by",
    "generate.mastery": "verify.mastery",
}
# keys that drove two things and now have a key each: the old key keeps its place and
# also sets the new one, where the new one is not given
SPLIT = {"generate.temperature": "verify.temperature"}


def upgrade(data: dict) -> dict:
    """``data`` (a config tree as given) with every key of :data:`RENAMED` moved to its
    new place and every key of :data:`SPLIT` copied to its new one; a key given under
    both names keeps the new name's value."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in [*RENAMED.items(), *SPLIT.items()]:
        (old_sec, old_key), (new_sec, new_key) = old.split("."), new.split(".")
        section = out.get(old_sec)
        if isinstance(section, dict) and old_key in section:
            value = section[old_key] if old in SPLIT else section.pop(old_key)
            target = out.setdefault(new_sec, {})
            if isinstance(target, dict):
                target.setdefault(new_key, value)
    return out


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
    """The teacher writes new instances: how many seeds, which, on which pool image, and
    how (seed selection: mmdc.stages.seeds; writing: mmdc.stages.generate)."""

    per_iteration: int = Field(192, ge=1)  # seeds asked per iteration
    # the share of the seeds drawn from the hard probes (the rest from the easy ones, asked
    # for a harder question); on the built-in task every seed hard, with by_yield, measured
    # best (docs/experiments)
    hard_share: float = Field(1.0, ge=0.0, le=1.0)
    rouge_threshold: float = Field(0.7, ge=0.0, le=1.0)  # the duplicate filter
    # hard seeds of a skill drawn in proportion to the share of the teacher's earlier
    # writing for that skill it could verify (targeted strategy, from the second iteration)
    by_yield: bool = True
    # rounds of writing more when the challenge filter leaves an iteration short of
    # max_accepted: the teacher writes again from the seeds whose instances were kept
    # (twice the missing count). Off by default: on the built-in task it filled the
    # targeted arm's third iteration without lifting the student (docs/experiments)
    refill: int = Field(0, ge=0)
    temperature: float = Field(0.7, ge=0.0)  # of the writing; 0: greedy
    max_new_tokens: int = Field(128, ge=8)  # of the writing
    # keep at most this many accepted instances per iteration (0: no limit); the rest are
    # dropped as over_budget. Comparing strategies at an equal generation budget uses it.
    max_accepted: int = Field(96, ge=0)
    # the pool image each seed's new instance is written on: "similar", one from the tenth
    # of the free images that look most like the seed's image in the student's (frozen)
    # vision tower, so that it can carry the seed's skill (a magnet question needs magnets,
    # and magnet pictures are as rare in the pool as in the seed split; the few nearest
    # would repeat the seed's answer), or "random", any free image
    pair_images: Literal["random", "similar"] = "similar"


class VerifyConfig(_Section):
    """The teacher calibrates the labels of what it wrote, and the challenge filter keeps
    what the student does not know yet (mmdc.stages.verify)."""

    k: int = Field(5, ge=1)  # sampled teacher answers for self-consistency
    # minimum agreement of the k + 1 votes (written label and k samples) to keep an
    # instance: 0.9 with k=5 asks all six to agree (the toy teacher's letters are sharp:
    # a disagreement marks a suspect instance); the real configs use 0.6
    tau: float = Field(0.9, ge=0.0, le=1.0)
    # whether the label the teacher wrote counts as one of the votes (false: the k
    # samples alone decide, and a written label they overrule is replaced)
    written_vote: bool = True
    # the format of the teacher's k verifying answers: its rationales (CQM-LEA; as long as
    # generate.max_new_tokens) or the letter alone (CQM-A; as long as eval.max_new_tokens).
    # The toy teacher's letters are its better labels
    prompt: Literal["CQM-A", "CQM-LEA"] = "CQM-A"
    temperature: float = Field(0.7, ge=0.0)  # of the k samples; 0: greedy (one answer)
    # drop instances the student already answers like the teacher (targeted strategy only),
    # judged per instance or per kind (the instances written for one seed skill and mode,
    # dropped together when the student answers at least `mastery` of them like the
    # teacher: judged one by one, a student that guesses keeps only its wrong guesses and
    # learns the other answer's bias)
    challenge: bool = True
    challenge_by: Literal["instance", "kind"] = "kind"
    mastery: float = Field(0.9, ge=0.0, le=1.0)


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


class ImproveConfig(_Section):
    """The self-improving teacher (mmdc.stages.improve), label-free: it finds where its own
    letter and rationale disagree on the probes, writes instances there, labels them by the
    majority of its sampled rationales and learns its letters on those labels, replaying
    seed-split instances it answers consistently (off: the teacher as given)."""

    enabled: bool = True
    seeds: int = Field(64, ge=0)  # seeds per iteration for the teacher's weak spots
    # the format of the k answers whose majority labels the teacher's own instances (its
    # written label votes too, as in verify.written_vote), and the share that must agree
    verify_prompt: Literal["CQM-A", "CQM-LEA"] = "CQM-LEA"
    tau: float = Field(0.9, ge=0.0, le=1.0)
    # seed-split instances where its letter and rationale agree, replayed with that shared
    # answer (never the split's label) in each update
    replay: int = Field(256, ge=0)
    # the length of the teacher's rationales when it checks itself (the probes, the replay
    # candidates, its votes on its own instances, its baseline in that format)
    rationale_max_new_tokens: int = Field(128, ge=1)
    # the teacher's LoRA update on its own labelled instances and the replay
    train: TrainConfig = TrainConfig(max_steps=100, learning_rate=5e-4)


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
    verify: VerifyConfig = VerifyConfig()
    loop: LoopConfig = LoopConfig()
    improve: ImproveConfig = ImproveConfig()
