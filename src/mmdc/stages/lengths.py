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

log = logging.getLogger(__name__)


class LengthCounter:
    """Token lengths of chat rows under one processor, image tokens counted as the
    processor expands them (asked once per image size)."""

    def __init__(self, processor):
        self.processor = processor
        self._per_size: dict[tuple[int, int], int] = {}

    def image_tokens(self, image) -> int:
        size = tuple(image.size)
        if size not in self._per_size:
            proc = self.processor
            text = proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                tokenize=False, add_generation_prompt=False)
            ids = proc(text=[text], images=[image], add_special_tokens=False)["input_ids"][0]
            image_id = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
            self._per_size[size] = sum(int(t == image_id) for t in ids)
        return self._per_size[size]

    def text_tokens(self, messages: list[dict], add_generation_prompt: bool = False) -> int:
        """Tokens of the conversation with each image as its one placeholder token."""
        text = self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def row(self, row: dict) -> tuple[int, int]:
        """(total tokens, image tokens) of a prompt-completion row (mmdc.stages.align.sft_rows),
        with one token of slack for the end-of-sequence token the trainer may add."""
        images = sum(self.image_tokens(img) for img in row.get("images") or [])
        n_images = len(row.get("images") or [])
        text = self.text_tokens(row["prompt"] + row["completion"])
        return text - n_images + images + 1, images

    def prompt(self, prompt: str, image) -> int:
        """Tokens of a generation prompt (the user turn and the assistant's opening)."""
        content = ([{"type": "image"}] if image is not None else []) + [
            {"type": "text", "text": prompt}]
        n = self.text_tokens([{"role": "user", "content": content}], add_generation_prompt=True)
        return n + (self.image_tokens(image) - 1 if image is not None else 0)


def fit_max_length(processor, rows: list[dict], configured: int | None, key: str) -> int:
    """The ``max_length`` to train ``rows`` with: the longest row when ``configured`` is
    None; ``configured`` when every row fits; else a ConfigError naming ``key`` and the
    length needed."""
    counter = LengthCounter(processor)
    longest, images = max((counter.row(r) for r in rows), default=(0, 0))
    if configured is None:
        log.debug("%s: sized from the data: %d tokens (%d image tokens)", key, longest, images)
        return longest
    if longest > configured:
        raise ConfigError(
            f"key '{key}': {configured} is too short for the data: its longest row needs "
            f"{longest} tokens ({images} of them image tokens); set {key}={longest} or more, "
            f"or leave it unset to size it from the data")
    return configured


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
    from mmdc.data.record import Instance  # noqa: F401 - for the reader
    from mmdc.models.load import load_processor, resolve_model_path
    from mmdc.prompts import build_prompt, build_write_prompt
    from mmdc.stages.align import sft_rows

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
        if role == "teacher" and cfg.loop.self_improve:
            t = cfg.loop.teacher_train
            need = lea + cfg.generate.max_new_tokens + 1
            if t.max_length is not None and need > t.max_length:
                raise ConfigError(
                    f"key 'loop.teacher_train.max_length': {t.max_length} is too short: the "
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
        check_positions(processor, resolve_model_path(mcfg.path), prompt_max, new, role)
