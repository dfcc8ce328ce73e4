"""The two roles as the loop uses them: the teacher through its configured backend, the
student in-process (both shared out over the ranks when there are several), the referee,
LoRA training of a role, and evaluation on the held-out test."""

from __future__ import annotations

import gc
from pathlib import Path

from mmdc.config import Config
from mmdc.evaluation import evaluate
from mmdc.models.load import load_configured


def loss_words(losses: list[float]) -> str:
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss logged"


def evaluate_on(cfg: Config, generator, test, desc: str, fmt: str | None = None,
                max_new_tokens: int | None = None):
    """``generator`` on the held-out test split with the eval settings (``fmt`` and
    ``max_new_tokens`` override the config's); pass it inline, so that it is released
    (this holds the last reference) before the next model loads."""
    res = evaluate(generator, test, fmt=fmt or cfg.eval.prompt, batch_size=cfg.eval.batch_size,
                   max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens,
                   limit=cfg.eval.limit, desc=desc)
    del generator
    gc.collect()
    return res


def train_role(cfg: Config, mcfg, rows: list[dict], start_adapter: str | None, out: Path,
                role_dir: Path, train_cfg, label: str | None = None,
                **trainer_kwargs) -> list[float]:
    """LoRA-train a role (continuing ``start_adapter`` when given) and save the adapter."""
    from transformers import set_seed

    from mmdc.models.load import load_adapter
    from mmdc.training import apply_lora, train_sft

    set_seed(cfg.seed)  # LoRA init and data order must not depend on what ran before
    loaded = load_configured(mcfg)
    model = loaded.model
    if start_adapter:
        model = load_adapter(model, start_adapter, is_trainable=True)
    else:
        model = apply_lora(model, cfg.align.lora)
    history = train_sft(model, loaded.processor, rows, out, train_cfg,
                        logging_dir=role_dir, seed=cfg.seed, label=label, **trainer_kwargs)
    return [h["loss"] for h in history if "loss" in h]


def teacher_backend(cfg: Config, teacher_adapter: str | None, run_dir: Path):
    """The teacher as its configured backend (in-process, a served endpoint or vLLM),
    its generation shared out over the ranks when there are several."""
    from mmdc.distributed import Sharded
    from mmdc.models.backends import load_backend

    if cfg.teacher.backend == "hf":
        return Sharded(load_configured(cfg.teacher, teacher_adapter))
    return Sharded(load_backend(cfg.teacher, cache_dir=run_dir / "cache"))


def student_model(cfg: Config, adapter: str | None):
    """The student for generation (answers, probes, evaluation), sharded over the ranks."""
    from mmdc.distributed import Sharded

    return Sharded(load_configured(cfg.student, adapter))


def referee(cfg: Config, teacher_adapter: str | None, run_dir: Path):
    from mmdc.config import ModelConfig
    from mmdc.stages.assess import AnswerAgreement, JudgeReferee, LikelihoodHardness

    a = cfg.assess
    if a.referee == "likelihood":
        return LikelihoodHardness(a.likelihood_threshold)
    if a.referee == "judge":
        if a.judge == "teacher":
            judge = teacher_backend(cfg, teacher_adapter, run_dir)
        elif a.judge == "student":
            judge = student_model(cfg, None)
        else:
            from mmdc.distributed import Sharded

            judge = Sharded(load_configured(ModelConfig(path=a.judge)))
        return JudgeReferee(judge, a.judge_threshold, a.judge_retries)
    return AnswerAgreement()
