"""Sequence lengths: what a training row or a generation needs, against what the config
and the model allow.

A LLaVA row is its image tokens (576 for LLaVA-1.5's 336 px CLIP, more for LLaVA-NeXT's
tiles), the prompt and the target. ``train.max_length`` unset (the default) sizes the
limit from the rows themselves; a value the user sets that is too short is refused before
any work starts, naming the key and the length needed, rather than failing inside TRL
("max_length is too short and causes image placeholder tokens ... to be truncated"). The
same check stops a generation that would run past the model's positions.
"""

from __future__ import annotations

import logging

from mmdc.errors import ConfigError
from mmdc.training import LengthCounter, fit_max_length

log = logging.getLogger(__name__)


def check_positions(processor, model_path, longest_prompt: int, max_new: dict[str, int],
                    role: str) -> None:
    """Refuse a ``max_new_tokens`` that would run the model past its positions on the
    longest prompt. ``max_new`` maps each config key to its value."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if not limit:
        return
    for key, new in sorted(max_new.items()):
        if longest_prompt + new > limit:
            raise ConfigError(
                f"key '{key}': {new} new tokens after the longest prompt ({longest_prompt} "
                f"tokens) run past the {role} model's {limit} positions "
                f"({model_path}); set {key}={max(1, limit - longest_prompt)} or less")


def check_lengths(cfg, seed_split, splits) -> None:
    """Before any work: every training row the run will build fits its ``max_length`` (when
    set) and no generation runs past a model's positions. ``splits`` are the splits the
    run asks models about (probe, test); the seed split is trained on."""
    from mmdc.data.prompts import build_prompt, build_write_prompt
    from mmdc.data.record import Instance  # noqa: F401 - for the reader
    from mmdc.models.load import load_processor, resolve_model_path
    from mmdc.training import sft_rows

    labelled = [i for i in seed_split.instances if i.answer is not None]
    seed_images = [seed_split.image(i) for i in labelled]
    asked = [(s, i) for s in splits for i in s.instances if i.choices]
    roles = {"student": cfg.student}
    if cfg.teacher.backend != "openai":
        roles["teacher"] = cfg.teacher
    for role, mcfg in roles.items():
        processor = load_processor(mcfg.path, mcfg.trust_remote_code)
        counter = LengthCounter(processor)
        if role in cfg.align.roles:
            fit_max_length(processor, sft_rows(labelled, seed_images, cfg.align.prompt),
                           cfg.align.train.max_length, "align.train.max_length")

        def longest(fmt, items=labelled, images=seed_images, counter=counter):
            return max((counter.prompt(build_prompt(i, fmt), img)
                        for i, img in zip(items, images)), default=0)

        lea, cqma = longest("CQM-LEA"), longest("CQM-A")
        if role == "student":
            # imitation rows: a seed prompt and the teacher's answer (at most its
            # max_new_tokens; a letter in CQM-A)
            im = cfg.imitate
            need = max((lea + im.max_new_tokens if f == "CQM-LEA" else cqma + 2)
                       for f in im.formats) + 1
            if im.train.max_length is not None and need > im.train.max_length:
                raise ConfigError(
                    f"key 'imitate.train.max_length': {im.train.max_length} is too short: an "
                    f"imitation row needs up to {need} tokens (the longest seed prompt and "
                    f"imitate.max_new_tokens={im.max_new_tokens}); set it to {need} or more, "
                    "or leave it unset to size it from the data")
        if role == "teacher" and cfg.improve.enabled:
            t = cfg.improve.train
            need = lea + cfg.improve.rationale_max_new_tokens + 1
            if t.max_length is not None and need > t.max_length:
                raise ConfigError(
                    f"key 'improve.train.max_length': {t.max_length} is too short: the "
                    f"teacher's update rows need up to {need} tokens; set it to {need} or "
                    "more, or leave it unset to size it from the data")
        others = [counter.prompt(build_prompt(i, fmt), s.image(i)) for s, i in asked
                  for fmt in ("CQM-A", "CQM-LEA")]
        prompt_max = max([lea, cqma, *others])
        if role == "student":
            new = {"eval.max_new_tokens": cfg.eval.max_new_tokens}
        else:
            write = max((counter.prompt(build_write_prompt(i, "rarer"), img)
                         for i, img in zip(labelled, seed_images)), default=0)
            prompt_max = max(prompt_max, write)
            new = {"eval.max_new_tokens": cfg.eval.max_new_tokens,
                   "imitate.max_new_tokens": cfg.imitate.max_new_tokens,
                   "generate.max_new_tokens": cfg.generate.max_new_tokens}
            if cfg.improve.enabled:
                new["improve.rationale_max_new_tokens"] = cfg.improve.rationale_max_new_tokens
        check_positions(processor, resolve_model_path(mcfg.path), prompt_max, new, role)
