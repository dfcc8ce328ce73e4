"""Training shared by the paper's steps: LoRA, supervised rows, the trainer, export.

Alignment (stage 1), the student's imitation and the teacher's own update all train the
same way: LoRA on the language model only (target modules chosen by a pattern on the
language-model path, so the CLIP vision tower is untouched), the vision-to-language
projector trained in full and saved with the adapter (``modules_to_save``), the vision
tower frozen. Training runs through TRL's ``SFTTrainer`` on prompt-completion
conversations, so the loss covers the answer tokens only, with ``max_length`` sized from
the rows themselves unless the config sets it. :func:`export_merged` writes a plain
``save_pretrained`` model with the adapter merged in.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from mmdc.config import LoraConfigSection, TrainConfig
from mmdc.data.prompts import build_prompt, build_target
from mmdc.data.record import Instance
from mmdc.errors import ConfigError

log = logging.getLogger(__name__)

PROJECTOR_MODULES = ["multi_modal_projector"]


def sft_rows(instances: list[Instance], images: list, fmt: str = "CQM-LEA",
             targets: list[str] | None = None) -> list[dict]:
    """Prompt-completion conversations (with images) for TRL's SFTTrainer."""
    rows = []
    for n, (inst, image) in enumerate(zip(instances, images, strict=True)):
        user = ([{"type": "image"}] if image is not None else []) + [
            {"type": "text", "text": build_prompt(inst, fmt)}]
        answer = targets[n] if targets is not None else build_target(inst, fmt)
        rows.append({
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [image] if image is not None else [],
        })
    return rows


def lora_config(settings: LoraConfigSection):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_pattern, modules_to_save=PROJECTOR_MODULES,
                      task_type="CAUSAL_LM")


def apply_lora(model, settings: LoraConfigSection):
    """Wrap ``model`` with a fresh LoRA adapter; the vision tower stays frozen."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(settings))
    for name, param in peft_model.named_parameters():
        if "vision_tower" in name:
            param.requires_grad_(False)
    return peft_model


def _failpoints(label: str):
    """Fault injection (tests): SIGKILL after training step N when MMDC_FAILPOINT says
    LABEL@N (see :mod:`mmdc.faults`)."""
    from transformers import TrainerCallback

    from mmdc.faults import maybe_fail

    class FailPoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            maybe_fail(f"{label}@{state.global_step}")

    return FailPoints()


def _non_finite_loss_guard(where: str):
    """A callback that stops training at the first logged non-finite loss, before the
    adapter is saved: the last good adapter (the run's previous step) stays in place."""
    import math

    from transformers import TrainerCallback

    from mmdc.errors import TrainingError

    class NonFiniteLossGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise TrainingError(
                    f"{where}: the training loss became {loss} by step {state.global_step}; "
                    "stopped without saving this adapter (the last good one is kept); "
                    "lower the learning rate or check the data")

    return NonFiniteLossGuard()


def _quiet_progress(desc: str):
    """The trainer's progress as one bar labelled ``desc``, the latest loss beside it;
    unlike transformers' own ``ProgressCallback`` it prints no log dictionaries (the logs
    still reach TensorBoard and the returned history)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class QuietProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, desc=desc, leave=False,
                                dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and "loss" in (logs or {}):
                self.bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return QuietProgress()


def train_sft(model, processor, rows: list[dict], out_dir: str | Path, settings: TrainConfig,
              logging_dir: str | Path | None = None, seed: int = 0, trainer_class=None,
              label: str | None = None, max_length_key: str = "train.max_length",
              callbacks: list | None = None, **trainer_kwargs):
    """Train ``model`` (already a PEFT model) on ``rows`` with TRL's SFTTrainer and save
    the adapter to ``out_dir``. Returns the trainer's log history. ``callbacks``: more
    ``TrainerCallback`` objects (a benchmark's step timer)."""
    import torch
    from datasets import Dataset
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback
    from trl import SFTConfig, SFTTrainer

    from mmdc import distributed
    from mmdc.errors import TrainingError

    out_dir = Path(out_dir)
    if not rows:
        raise TrainingError(f"{label or out_dir}: nothing to train on (no rows: every "
                            "instance was unlabelled or every teacher answer unparsable)")
    cpu = not torch.cuda.is_available()
    multi = distributed.world_size() > 1
    max_length = fit_max_length(processor, rows, settings.max_length, max_length_key)

    def make_args(batch: int, accum: int):
        return SFTConfig(
            output_dir=str(out_dir / "trainer"), per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum, max_steps=settings.max_steps,
            learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps,
            lr_scheduler_type="cosine",
            logging_steps=min(settings.logging_steps, settings.max_steps),
            save_strategy="no",
            report_to="none",
            seed=seed, data_seed=seed, max_length=max_length,
            completion_only_loss=True, remove_unused_columns=False, use_cpu=cpu,
            ddp_backend="gloo" if cpu and multi else None,
            ddp_find_unused_parameters=False if multi else None,
            dataloader_num_workers=0, disable_tqdm=False, bf16=False,
            logging_nan_inf_filter=False,  # a diverged loss must show, not be averaged away
            gradient_checkpointing=settings.gradient_checkpointing,
        )

    batch = distributed.per_device_batch(settings.batch_size)
    accum = settings.grad_accum
    # what training changes, kept to start again from if a batch does not fit in memory
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dataset = Dataset.from_list(rows)
    while True:
        own = [_non_finite_loss_guard(str(out_dir)), _failpoints(label or out_dir.name),
               *(callbacks or [])]
        writer = None
        if distributed.is_main():  # one event file, written by rank 0
            writer = SummaryWriter(log_dir=str(
                logging_dir or out_dir.with_name(out_dir.name + "-tensorboard")))
            own.insert(0, TensorBoardCallback(tb_writer=writer))
        trainer = (trainer_class or SFTTrainer)(
            model=model, args=make_args(batch, accum), train_dataset=dataset,
            processing_class=processor, callbacks=own, **trainer_kwargs)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for noisy in (ProgressCallback, PrinterCallback):  # they print every log dict
            trainer.remove_callback(noisy)
        name = (label or out_dir.name).replace("iter_", "iter ").replace("/", ": ")
        trainer.add_callback(_quiet_progress(name.replace("_", " ")))
        try:
            trainer.train()
            break
        except RuntimeError as exc:
            from accelerate.utils.memory import release_memory, should_reduce_batch_size

            if not should_reduce_batch_size(exc):
                raise
            if batch == 1 or multi:
                raise TrainingError(
                    f"{out_dir}: out of memory training at a per-device batch of {batch}"
                    + (" on several processes" if multi else "")
                    + "; lower train.batch_size or max_length, or use a device with more "
                      "memory") from None
            log.warning("%s: out of memory at a per-device batch of %d; retrying from the "
                        "start with %d x %d gradient accumulation (same global batch)",
                        out_dir, batch, batch // 2, accum * 2)
            del trainer
            release_memory()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            batch, accum = batch // 2, accum * 2
        finally:
            if writer is not None:
                writer.close()
    history = trainer.state.log_history
    # under several processes every rank takes part in gathering the weights (FSDP and
    # ZeRO-3 shard them); rank 0 writes the adapter, which PEFT filters out of the state
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if multi else None
    if trainer.is_world_process_zero():
        from mmdc.data.pool import write_dir_atomic

        shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # nothing is saved there
        write_dir_atomic(out_dir, lambda tmp: model.save_pretrained(tmp, state_dict=state))
    trainer.accelerator.wait_for_everyone()
    return history


def export_merged(peft_model, processor, out_dir: str | Path) -> Path:
    """Merge the adapter into the base weights and save a plain HF checkpoint."""
    out_dir = Path(out_dir)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


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
        """(total tokens, image tokens) of a prompt-completion row (mmdc.training.sft_rows),
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
