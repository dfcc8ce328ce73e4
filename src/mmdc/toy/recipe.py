"""The toy training recipes: what gives the tiny teacher its skill and the tiny student
its weaker base, on top of the frozen toy vision tower (:mod:`mmdc.toy.vision`).

They stand in for what a hub checkpoint already knows, in LLaVA's order: the vision
tower is pretrained on its own and kept frozen; then the projector and the language
model learn in stages, each a mix of formats drawn fresh from the world:

* ``vqa``: short answers ("What color is the circle?" -> "red"), as in LLaVA-1.5's VQA
  data: cheap sequences and a dense signal, where the language model learns to ground
  the question in the image (which patch, which count, which pole);
* ``cqm-a`` and ``cqm-lea``: the task's answer formats (the option's letter; a lecture,
  a solution and "The answer is X.");
* ``write``: the teacher's generation format: a seed question and an image in, a new
  well-posed instance about that image out (:func:`mmdc.toy.world.write_instance`).

The teacher learns every skill; the student, a much smaller language model, learns to
ground every skill but sees the hard skills' answer formats only rarely, so its shortfall
lies where distillation calibration can help. This is a plain PyTorch loop over pre-tokenised
tensors: at this size the HF ``Trainer`` machinery costs more than the model. The
calibration stages use TRL.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mmdc.data.prompts import build_prompt, build_target, build_write_prompt, format_written
from mmdc.data.record import Instance
from mmdc.generation import chat_text
from mmdc.toy import world

log = logging.getLogger(__name__)

FORMATS = ("vqa", "cqm-a", "cqm-lea", "write")
ALL_SKILLS = {k: 1.0 for k in world.SKILL_NAMES}


@dataclass(frozen=True)
class Stage:
    """One training stage: ``steps`` optimizer steps of ``batch_size`` examples, drawn
    with skills in proportion to ``skills`` and formats in proportion to ``formats``."""

    name: str
    steps: int
    lr: float
    formats: dict[str, float]
    skills: dict[str, float] = field(default_factory=lambda: dict(ALL_SKILLS))
    batch_size: int = 32
    warmup: int = 100
    weight_decay: float = 0.01
    examples: int = 40000  # distinct examples drawn (cycled when steps need more)


@dataclass(frozen=True)
class Recipe:
    """A role's stages; ``seed_letters`` names skills whose letter examples (``cqm-a``)
    come only from the built-in task's seed split (its train split at the build seed), as
    a model fine-tuned on that split learnt its direct answers: rare there, so weak."""

    stages: tuple[Stage, ...]
    seed_letters: tuple[str, ...] = ()


def seed_letter_sets(the_recipe: Recipe, seed: int = 0) -> dict[str, list[Instance]] | None:
    """The seed split's instances of each skill in ``the_recipe.seed_letters`` (None when
    it names none): what :func:`build_examples` cycles through for their letters."""
    if not the_recipe.seed_letters:
        return None
    split = [inst for inst, _ in world.generate_split("train", world.TaskSizes().train, seed)]
    return {k: [i for i in split if i.skill == k] for k in the_recipe.seed_letters}


def skill_weights(**more: float) -> dict[str, float]:
    """Every skill at weight 1, except those named."""
    return {**ALL_SKILLS, **more}


# Measured per-skill learning curves (docs/experiments/results/toy_teacher_curves_cpu.txt) set
# the steps and weights: the relational skills ground within the vqa stage; reading a
# colour by its shape ("What color is the triangle?") is the slowest lookup, so it is
# drawn three times as often there; spatial's four options need a long answer stage.
#
# Like LLaVA-13B, which was fine-tuned on the same ScienceQA train split as the student,
# the teacher is not an oracle: its rationales (cqm-lea) and its grounding are broad, but
# its direct answers for three multi-step skills come from the seed split's 17 instances
# each. On the held-out test its letters then answer compare and count_color 80 and 52,
# its rationales 100 and 100 (docs/experiments/results/teacher_seed_letters_cpu.txt): a gap it
# can find by itself (letter and rationale disagree) and close by its own rationales.
TEACHER_RECIPE = Recipe(seed_letters=("compare", "magnets", "count_color"), stages=(
    # grounding: short answers read from the image through projector + language model
    Stage("vqa", steps=4000, lr=3e-4, formats={"vqa": 1.0}, skills=skill_weights(color=3.0)),
    # answer-focused: the same questions with options, the letter as the answer
    Stage("answer", steps=3000, lr=3e-4, formats={"cqm-a": 0.7, "vqa": 0.3},
          skills=skill_weights(color=2.0, spatial=2.0, alphabet=2.0)),
    # the other formats the loop needs: rationales and writing new instances
    Stage("instruct", steps=3000, lr=2e-4, formats={"cqm-a": 0.25, "cqm-lea": 0.25,
                                                    "write": 0.4, "vqa": 0.1}),
))
# The student, like a smaller model pretrained on broad data and then instruction-tuned on
# a narrower set, learns to ground every skill in the image (short answers, all skills
# alike) but meets the hard skills' question formats (options, rationales) only rarely
# (1 in 50 of an easy skill's share): its gaps are where the task's answers are rare in
# its instruction data, and the grounding it needs to fill them is there
# (docs/experiments/results/toy_student_curves_cpu.txt). Spatial is the exception: its
# four-quarter letter takes this student about a thousand instances and a thousand steps
# (docs/experiments/results/imitation_ceiling_spatial_steps_cpu.txt), more than a calibration
# loop of the default's size gives, so the student learns it in its build (drawn twice as
# often as an easy skill) and its gaps are the ones a loop can fill. Magnets is learnt in
# the build too: its gaps are the two skills where the teacher's own letters are weak
# (compare, count_color), so what the teacher fixes in itself is what the student lacks.
STUDENT_GAPS = ("compare", "count_color")
STUDENT_ANSWER_SKILLS = skill_weights(spatial=2.0, **{k: 0.02 for k in STUDENT_GAPS})
STUDENT_RECIPE = Recipe(stages=(
    Stage("vqa", steps=5000, lr=1e-3, formats={"vqa": 1.0}),
    Stage("answer", steps=2500, lr=1e-3, formats={"cqm-a": 0.5, "cqm-lea": 0.3, "vqa": 0.2},
          skills=STUDENT_ANSWER_SKILLS),
))


@dataclass
class Example:
    prompt: str
    scene: dict | None
    target: str


def _written_example(seed: Instance, rng: random.Random, i: int) -> Example:
    """The teacher sees a seed question and a pool-like image and writes a new instance
    of the kind asked for, or the nearest kind the image can carry."""
    mode = "same" if rng.random() < 0.6 else "rarer"
    scene = world.random_scene(rng) if seed.image is not None else None
    new = world.write_instance(seed, mode, scene, rng, f"w-{i}")
    return Example(build_write_prompt(seed, mode), scene, format_written(new))


def build_examples(stage: Stage, seed: int = 0,
                   letters: dict[str, list[Instance]] | None = None) -> list[Example]:
    """The stage's examples, drawn from the world (deterministic for a seed).

    ``letters`` maps a skill to a fixed set of instances: that skill's letter examples
    (``cqm-a``) then cycle through the set instead of fresh draws, as a model whose direct
    answers for the skill were fine-tuned on a small seed split only."""
    instances = world.sample_instances(stage.examples, stage.skills, f"recipe-{stage.name}",
                                       seed)
    rng = random.Random(f"mmdc-recipe-{stage.name}-{seed}")
    names = list(stage.formats)
    weights = [stage.formats[k] for k in names]
    examples = []
    used = dict.fromkeys(letters or {}, 0)
    for i, inst in enumerate(instances):
        fmt = rng.choices(names, weights)[0]
        if fmt == "cqm-a" and inst.skill in used:
            inst = letters[inst.skill][used[inst.skill] % len(letters[inst.skill])]
            used[inst.skill] += 1
        scene = inst.meta.get("scene")
        if fmt == "write":
            examples.append(_written_example(inst, rng, i))
        elif fmt == "vqa":
            examples.append(Example(world.vqa_prompt(inst), scene, world.vqa_answer(inst)))
        else:
            f = fmt.upper()
            examples.append(Example(build_prompt(inst, f), scene, build_target(inst, f)))
    return examples


def image_token_count(processor) -> int:
    """How many tokens the processor expands one ``<image>`` into (patches, plus the
    class token, minus one under the "default" feature strategy)."""
    size = processor.image_processor.size
    patches = (size["height"] // processor.patch_size) * (size["width"] // processor.patch_size)
    drop = 1 if processor.vision_feature_select_strategy == "default" else 0
    return patches + processor.num_additional_image_tokens - drop


def tokenize_examples(processor, examples: list[Example], chunk: int = 512) -> list[dict]:
    """Pre-tokenise in chunks: input ids with the image token expanded as the processor
    expands it, labels on the answer only, pixel values from the image processor."""
    tok = processor.tokenizer
    per_image = processor.image_token * image_token_count(processor)
    out: list[dict] = []
    for start in tqdm(range(0, len(examples), chunk), desc="tokenize", leave=False):
        part = examples[start:start + chunk]
        texts = [chat_text(processor, ex.prompt, ex.scene is not None)
                 .replace(processor.image_token, per_image) for ex in part]
        prompts = tok(texts, add_special_tokens=False)["input_ids"]
        targets = tok([" " + ex.target for ex in part], add_special_tokens=False)["input_ids"]
        images = [world.draw_scene(ex.scene) for ex in part if ex.scene is not None]
        pixels = iter(processor.image_processor(images, return_tensors="pt")["pixel_values"]
                      if images else ())
        for ex, prompt_ids, target_ids in zip(part, prompts, targets):
            target_ids = target_ids + [tok.eos_token_id]
            out.append({"input_ids": prompt_ids + target_ids,
                        "labels": [-100] * len(prompt_ids) + target_ids,
                        "pixel_values": next(pixels) if ex.scene is not None else None})
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


def train(model, processor, data: list[dict], stage: Stage, seed: int = 0,
          desc: str = "train", log_every: int = 100, on_step=None) -> list[float]:
    """Run one stage on the model's device, training the parameters that require
    gradients (the frozen tower does not); returns the per-step losses.
    ``on_step(step, losses)``, when given, is called after each step (1-based)."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay,
                            betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, stage.warmup, stage.steps)
    pad = processor.tokenizer.pad_token_id
    device = next(model.parameters()).device
    batches: list[list[int]] = []
    losses = []
    start = time.time()
    bar = tqdm(range(stage.steps), desc=desc, leave=False)
    for step in bar:
        if not batches:
            batches = _length_grouped_batches(data, stage.batch_size, rng)
        batch = collate([data[i] for i in batches.pop()], pad)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{desc}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            bar.set_postfix(loss=f"{recent:.3f}")
            log.info("%s step %d/%d loss %.4f (%.0fs)", desc, step + 1, stage.steps, recent,
                     time.time() - start)
        if on_step is not None:
            on_step(step + 1, losses)
    model.eval()
    return losses
