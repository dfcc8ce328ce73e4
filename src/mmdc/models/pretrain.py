"""The toy pre-training recipe: gives the tiny teacher its broad ability and the tiny
student its weaker base, on the synthetic task's ``pretrain`` split.

It stands in for what a hub checkpoint already knows: the teacher learns to answer
directly (CQM-A), to answer with a rationale (CQM-LEA), and to write a new instance about
a given image in the layout :func:`mmdc.prompts.parse_written` reads. The student base
learns the two answer formats for fewer steps with ~1/14 of the parameters.

This is a plain PyTorch loop over fully pre-tokenised tensors: at this size the HF
``Trainer`` machinery costs more than the model. The calibration stages use TRL.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mmdc.data import synthetic
from mmdc.data.record import Instance
from mmdc.generation import chat_text
from mmdc.prompts import build_prompt, build_target, build_write_prompt, format_written

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 100
    weight_decay: float = 0.01
    write_fraction: float = 0.0  # share of examples that teach instance writing
    caption_fraction: float = 0.0  # share of examples that describe the scene (grounding)
    lea_fraction: float = 0.5  # share of answer examples in the CQM-LEA format


TEACHER_RECIPE = Recipe(steps=3600, lr=5e-4, write_fraction=0.25, caption_fraction=0.15)
STUDENT_RECIPE = Recipe(steps=1500, lr=1e-3, caption_fraction=0.15)


@dataclass
class Example:
    prompt: str
    scene: dict | None
    target: str


def _written_example(seed_inst: Instance, rng: random.Random, i: int) -> Example:
    """The teacher sees a seed question and a new image and writes a new instance."""
    mode = "same" if rng.random() < 0.7 else "rarer"
    skill = seed_inst.skill
    if mode == "rarer" and seed_inst.image is not None:
        subject = synthetic.SKILLS[skill].subject
        harder = [s for s in synthetic.HARD_SKILLS if synthetic.SKILLS[s].subject == subject]
        skill = rng.choice(harder)
    new = synthetic.make_instance(skill, rng, f"w-{i}", "pretrain")
    return Example(build_write_prompt(seed_inst, mode), new.meta.get("scene"),
                   format_written(new))


def build_examples(instances: list[Instance], recipe: Recipe, seed: int) -> list[Example]:
    rng = random.Random(f"mmdc-pretrain-examples-{seed}")
    examples = []
    for i, inst in enumerate(instances):
        scene = inst.meta.get("scene")
        r = rng.random()
        if r < recipe.write_fraction:
            examples.append(_written_example(inst, rng, i))
            continue
        if scene is not None and r < recipe.write_fraction + recipe.caption_fraction:
            examples.append(Example(synthetic.CAPTION_PROMPT, scene,
                                    synthetic.describe_scene(scene)))
            continue
        fmt = "CQM-LEA" if rng.random() < recipe.lea_fraction else "CQM-A"
        examples.append(Example(build_prompt(inst, fmt), scene, build_target(inst, fmt)))
    return examples


def tokenize_examples(processor, examples: list[Example]) -> list[dict]:
    """Pre-tokenise: input ids with image tokens expanded, labels on the answer only."""
    tok = processor.tokenizer
    out = []
    for ex in tqdm(examples, desc="tokenize", leave=False):
        has_image = ex.scene is not None
        prompt = chat_text(processor, ex.prompt, has_image)
        if has_image:
            image = synthetic.draw_scene(ex.scene)
            enc = processor(text=[prompt], images=[image], add_special_tokens=False,
                            return_tensors="pt")
            pixel = enc["pixel_values"][0]
        else:
            enc = processor(text=[prompt], add_special_tokens=False, return_tensors="pt")
            pixel = None
        prompt_ids = enc["input_ids"][0].tolist()
        target_ids = tok(" " + ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": prompt_ids + target_ids,
                    "labels": [-100] * len(prompt_ids) + target_ids, "pixel_values": pixel})
    return out


def collate(batch: list[dict], pad_id: int) -> dict:
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pixels = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out


def _length_grouped_batches(data: list[dict], batch_size: int, rng: random.Random,
                            group: int = 64) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length within groups of ``group``
    batches so that padding (and compute) stays small; batch order shuffled again."""
    order = list(range(len(data)))
    rng.shuffle(order)
    span = batch_size * group
    batches = []
    for g in range(0, len(order), span):
        chunk = sorted(order[g:g + span], key=lambda i: len(data[i]["input_ids"]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train(model, processor, data: list[dict], recipe: Recipe, seed: int = 0,
          desc: str = "pretrain", log_every: int = 100, on_step=None) -> list[float]:
    """Run the recipe on the model's device; returns the per-step losses.
    ``on_step(step, losses)``, when given, is called after each step (1-based)."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                            betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, recipe.warmup, recipe.steps)
    pad = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    batches: list[list[int]] = []
    losses = []
    start = time.time()
    bar = tqdm(range(recipe.steps), desc=desc, leave=False)
    for step in bar:
        if not batches:
            batches = _length_grouped_batches(data, recipe.batch_size, rng)
        batch = collate([data[i] for i in batches.pop()], pad)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{desc}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            bar.set_postfix(loss=f"{recent:.3f}")
            log.info("%s step %d/%d loss %.4f (%.0fs)", desc, step + 1, recipe.steps, recent,
                     time.time() - start)
        if on_step is not None:
            on_step(step + 1, losses)
    model.eval()
    return losses
