"""Probe the toy recipes: per-skill learning curves of each training stage.

Builds (or loads) the toy vision tower, assembles a teacher or student on it, and runs the
role's recipe (:mod:`mmdc.toy.recipe`) stage by stage, printing every ``--eval-every``
steps the held-out accuracy per skill in the stage's own terms:

* a ``vqa`` stage: greedy first token of the short answer (one forward pass);
* an ``instruct`` stage: ``mmdc eval``'s path (CQM-A through generation, 8 new tokens;
  CQM-LEA with 64), and, when the stage writes, how many written instances parse and are
  well-posed with the right label on fresh pool-like images.

    python docs/experiments/probes/toy_recipe_probe.py --role teacher
    python docs/experiments/probes/toy_recipe_probe.py --role student --eval-every 250
    python docs/experiments/probes/toy_recipe_probe.py --role teacher --stage instruct --init DIR

``--steps S1,S2`` overrides the stages' steps (for a quick look); ``--save DIR`` keeps
the model after the last stage run; ``--init DIR`` starts from a saved model (evaluated
once before its first step). Nothing here is part of the shipped build, which runs the
same stages through ``build_toy``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmdc.config import GenerateConfig
from mmdc.data.prompts import build_prompt, parse_answer
from mmdc.generation import Request, chat_text, generate
from mmdc.toy import build, models, recipe, world
from mmdc.toy.diagnostics import writing_check


def vqa_accuracy(model, processor, val) -> dict[str, float]:
    tok = processor.tokenizer
    hits = defaultdict(list)
    for with_image in (True, False):
        items = [i for i in val if (i.image is not None) == with_image]
        for s in range(0, len(items), 64):
            part = items[s:s + 64]
            texts = [chat_text(processor, world.vqa_prompt(i), with_image) for i in part]
            images = [world.draw_scene(i.meta["scene"]) for i in part] if with_image else None
            side = tok.padding_side
            tok.padding_side = "left"
            enc = processor(text=texts, images=images, padding=True, return_tensors="pt",
                            add_special_tokens=False)
            tok.padding_side = side
            with torch.no_grad():
                pred = model(**enc).logits[:, -1].argmax(-1).tolist()
            for i, p in zip(part, pred):
                first = tok(" " + world.vqa_answer(i), add_special_tokens=False)["input_ids"][0]
                hits[i.skill].append(p == first)
    return _summary(hits)


def _summary(hits) -> dict[str, float]:
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["avg"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


def answer_accuracy(model, processor, val, fmt: str, max_new_tokens: int) -> dict[str, float]:
    reqs = [Request(build_prompt(i, fmt), world.draw_scene(i.meta["scene"])
                    if i.meta.get("scene") else None) for i in val]
    outs = generate(model, processor, reqs, max_new_tokens=max_new_tokens, batch_size=64,
                    progress=False)
    hits = defaultdict(list)
    for i, o in zip(val, outs):
        hits[i.skill].append(parse_answer(o, len(i.choices)) == i.answer)
    return _summary(hits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="teacher", choices=list(build.ROLES))
    ap.add_argument("--stage", default=None, help="run only this stage (default: all)")
    ap.add_argument("--steps", default=None, help="comma list overriding each stage's steps")
    ap.add_argument("--lr", type=float, default=None, help="override every stage's lr")
    ap.add_argument("--skills", default=None, help="skill weights for every stage, e.g. "
                    "spatial=3,color=2 (the rest 1)")
    ap.add_argument("--hard", default=None, help="comma list: each stage's weight for the hard "
                    "skills (the easy ones at 1), e.g. 1,0.05")
    ap.add_argument("--spec", default=None, help="the language model as hidden,layers,heads,"
                    "intermediate (default: the role's spec)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--tower", default=None, help="a built vision folder (default: build one "
                    "into --work)")
    ap.add_argument("--init", default=None, help="start from this saved model folder")
    ap.add_argument("--save", default=None)
    ap.add_argument("--work", default="runs/probe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lea-tokens", type=int, default=GenerateConfig().max_new_tokens,
                    help="new tokens for CQM-LEA answers (default: the loop's "
                    "generate.max_new_tokens; a spatial rationale with its answer is over 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-letters", default=None, help="comma list of skills whose letter "
                    "examples (CQM-A) come only from the seed split's instances of them "
                    "(the task's train split, data seed --seed), e.g. compare,magnets; "
                    "default: the role's recipe (\"\" for none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    spec, the_recipe = build.ROLES[args.role]
    stages = list(the_recipe.stages)
    if args.steps:
        stages = [replace(s, steps=int(n)) for s, n in zip(stages, args.steps.split(","))]
    if args.lr:
        stages = [replace(s, lr=args.lr) for s in stages]
    if args.skills:
        weights = recipe.skill_weights(**{name: float(value) for name, value in
                                          (part.split("=") for part in args.skills.split(","))})
        stages = [replace(s, skills=weights) for s in stages]
    if args.hard:
        stages = [replace(s, skills=recipe.skill_weights(**{k: float(w) for k in world.HARD_SKILLS}))
                  for s, w in zip(stages, args.hard.split(","))]
    if args.spec:
        h, n, heads, inter = (int(x) for x in args.spec.split(","))
        spec = models.ToySpec(text_hidden=h, text_layers=n, text_heads=heads,
                              text_intermediate=inter)
    if args.stage:
        stages = [s for s in stages if s.name == args.stage]
    tower_dir = Path(args.tower) if args.tower else Path(args.work) / build.VISION
    if not (tower_dir / "model.safetensors").is_file():
        stats = build.build_vision(tower_dir, args.seed)["pretraining"]
        print(f"vision tower: {stats['steps']} steps, {stats['seconds']}s, held-out "
              f"{stats['heldout_acc']}", flush=True)
    tower = build.load_tower(tower_dir)
    tok = models.build_tokenizer(args.seed)
    if args.init:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.init)
        processor = AutoProcessor.from_pretrained(args.init)
    else:
        model = models.build_model(spec, tok, seed=args.seed, tower=tower)
        processor = models.build_processor(tok)
    model.model.vision_tower.requires_grad_(False)
    lm = sum(p.numel() for p in model.model.language_model.parameters())
    print(f"{args.role}: {sum(p.numel() for p in model.parameters()):,} params, language "
          f"model {lm:,}", flush=True)
    val = world.sample_instances(320, recipe.ALL_SKILLS, "probe-val", args.seed, "val")
    if args.seed_letters is not None:  # "" : none
        the_recipe = replace(the_recipe, seed_letters=tuple(filter(None,
                                                                   args.seed_letters.split(","))))
    letters = recipe.seed_letter_sets(the_recipe, args.seed)
    if letters:
        print("letters from the seed split: " + ", ".join(f"{k} {len(v)}" for k, v in
                                                          letters.items()), flush=True)
    for stage in stages:
        data = recipe.tokenize_examples(processor, recipe.build_examples(stage, args.seed,
                                                                         letters))
        print(f"== {args.role} {stage.name}: {stage.steps} steps, lr {stage.lr}, formats "
              f"{stage.formats}, {len(data)} examples", flush=True)
        start = time.time()

        def report(step, losses, stage=stage, start=start):
            if step % args.eval_every and step != stage.steps:
                return
            model.eval()
            loss = f"{sum(losses[-50:]) / len(losses[-50:]):.3f}" if losses else "-"
            line = f"step {step} loss {loss} {time.time() - start:.0f}s"
            parts = {}
            if set(stage.formats) - {"vqa"}:
                parts = {"CQM-A": answer_accuracy(model, processor, val, "CQM-A", 8),
                         "CQM-LEA": answer_accuracy(model, processor, val, "CQM-LEA",
                                                    args.lea_tokens)}
            if "vqa" in stage.formats:  # is the grounding still there?
                parts["vqa"] = vqa_accuracy(model, processor, val)
            for name, acc in parts.items():
                line += f" | {name} " + " ".join(f"{k}={v:.2f}" for k, v in acc.items())
            if "write" in stage.formats:
                w = writing_check(model, processor, seed=args.seed)
                line += (f" | write parsed {w['parsed']}/{w['asked']} right {w['correct']} "
                         f"ill-posed {w['ill_posed']} wrong {w['wrong']} "
                         f"off {w['off_template']}")
            model.train()
            tqdm.write(line)  # on a line of its own, above the training bar

        if args.init and stage is stages[0]:  # the saved model before any step
            report(0, [])
        recipe.train(model, processor, data, stage, seed=args.seed,
                     desc=f"{args.role} {stage.name}", on_step=report)
        if not build.tower_unchanged(model, tower) and not args.init:
            raise SystemExit("the frozen tower changed")
    if args.save:
        model.save_pretrained(args.save)
        processor.save_pretrained(args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
