"""Probe the toy pre-training recipe: how fast does a tiny LLaVA learn each skill?

Trains one toy spec from scratch on the synthetic ``pretrain`` split (optionally only some
skills, optionally with auxiliary "In which row/column is the <colour> shape?" questions)
and prints validation accuracy per skill every ``--eval-every`` steps. Accuracy is the
greedy first answer token against the right letter on the ``val`` split, CQM-A (one
forward pass, no generation: a fast proxy for ``mmdc eval``). Used to find a teacher recipe
that fits the 20-minute CPU build; nothing here is part of the shipped build.

    python benchmarks/toy_recipe_probe.py --spec 32,1,2,56,2,2,112 --skills color --steps 1500
    python benchmarks/toy_recipe_probe.py --skills magnets --pos-std 0.6 --steps 2000

``--spec`` is ToySpec's first seven fields: vision hidden, layers, heads, text hidden,
layers, heads, intermediate. Tokenised data is cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from mmdc.data import synthetic
from mmdc.data.record import Instance
from mmdc.generation import chat_text
from mmdc.models import pretrain, toy
from mmdc.prompts import build_prompt


def position_questions(n: int, seed: int) -> list[tuple[Instance, dict]]:
    """Auxiliary grounding questions: the row or column of the one shape of a colour."""
    rng = random.Random(f"probe-aux-{seed}")
    out = []
    while len(out) < n:
        scene = synthetic.random_object_scene(rng, 1, 6)
        objs = scene["objects"]
        unique = [o for o in objs if sum(p["color"] == o["color"] for p in objs) == 1]
        if not unique:
            continue
        o = rng.choice(unique)
        which = rng.choice(["row", "column"])
        value = o["row"] if which == "row" else o["col"]
        out.append((Instance(id=f"aux{len(out)}", image="aux",
                             question=f"In which {which} is the {o['color']} shape?",
                             choices=["1", "2", "3", "4"], answer=value, skill="position"),
                    scene))
    return out


def tinted(draw):
    """Wrap draw_scene: tint empty pixels by their cell's row (red) and column (blue)."""
    def draw_tinted(scene, amount):
        img = draw(scene)
        px = img.load()
        for y in range(img.height):
            for x in range(img.width):
                if px[x, y] == (255, 255, 255):
                    r, c = y // synthetic.CELL, x // synthetic.CELL
                    px[x, y] = (255 - amount * r, 255, 255 - amount * c)
        return img
    return draw_tinted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="96,2,4,192,3,4,512", help="the teacher spec by default")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--n", type=int, default=30000, help="pretrain instances drawn")
    ap.add_argument("--skills", default="", help="comma list to train and validate on "
                    "(default all); 'none' for position questions only")
    ap.add_argument("--aux", type=float, default=0.0,
                    help="add this many times --n position questions")
    ap.add_argument("--pos-std", type=float, default=2.0,
                    help="scale of the vision position init (ToySpec.position_std)")
    ap.add_argument("--pos-init", default="sincos", choices=["random", "sincos"],
                    help="vision position embedding init: the shipped 2-D sin-cos table "
                         "(toy.sincos_position_table) or random N(0, pos-std)")
    ap.add_argument("--write", type=float, default=0.0, help="share of instance-writing examples")
    ap.add_argument("--caption", type=float, default=0.0, help="share of caption examples")
    ap.add_argument("--tint", type=int, default=0, help="tint empty cells by position")
    ap.add_argument("--lea", type=float, default=0.0, help="share of CQM-LEA targets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="runs/probe_cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tint:
        draw = tinted(synthetic.draw_scene)
        synthetic.draw_scene = lambda scene: draw(scene, args.tint)
    spec = toy.ToySpec(*[int(x) for x in args.spec.split(",")], position_std=args.pos_std)
    tok = toy.build_tokenizer(0)
    proc = toy.build_processor(tok, spec)
    keep = set(args.skills.split(",")) if args.skills else set(synthetic.SKILL_NAMES)
    keep.add("position")

    cache = Path(args.cache) / f"pretrain_{args.n}_{args.lea}_{args.tint}_{args.write}_{args.caption}.pt"
    instances = [i for i, _ in synthetic.generate_split("pretrain", args.n, 0)]
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
    else:
        recipe = pretrain.Recipe(steps=1, lr=1.0, lea_fraction=args.lea,
                                 write_fraction=args.write, caption_fraction=args.caption)
        data = pretrain.tokenize_examples(proc, pretrain.build_examples(instances, recipe, 0))
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, cache)
    data = [d for d, inst in zip(data, instances) if inst.skill in keep]
    val = [(i, i.meta.get("scene")) for i, _ in synthetic.generate_split("val", 480, 0)
           if i.skill in keep]
    if args.aux:
        aux = position_questions(int(args.aux * args.n), 7)
        data += pretrain.tokenize_examples(proc, [
            pretrain.Example(build_prompt(i, "CQM-A"), s, i.answer_letter) for i, s in aux])
        val += position_questions(200, 8)
    if not data:
        raise SystemExit("no training data: check --skills / --aux")

    letters = [tok(" " + x, add_special_tokens=False)["input_ids"][0] for x in "ABCDEF"]
    texts = [chat_text(proc, build_prompt(i, "CQM-A"), s is not None) for i, s in val]
    images = [synthetic.draw_scene(s) if s is not None else None for _, s in val]

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        model.eval()
        hits = defaultdict(list)
        for with_image in (True, False):
            idx = [k for k in range(len(val)) if (images[k] is not None) == with_image]
            for s in range(0, len(idx), 64):
                b = idx[s:s + 64]
                enc = proc(text=[texts[k] for k in b],
                           images=[images[k] for k in b] if with_image else None,
                           padding=True, return_tensors="pt", add_special_tokens=False)
                enc = {k: v.to(args.device) for k, v in enc.items()}
                pred = model(**enc).logits[:, -1].argmax(-1).tolist()
                for k, p in zip(b, pred):
                    hits[val[k][0].skill].append(p == letters[val[k][0].answer])
        model.train()
        out = {s: sum(h) / len(h) for s, h in sorted(hits.items())}
        out["avg"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
        return out

    tok.padding_side = "left"
    model = toy.build_model(spec, tok, args.seed)
    if args.pos_init == "random":
        pos = model.model.vision_tower.embeddings.position_embedding.weight
        torch.nn.init.normal_(pos, std=args.pos_std)
    model.to(args.device)
    print(f"spec {spec}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(data)} training examples, {len(val)} validation items", flush=True)
    recipe = pretrain.Recipe(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    start = time.time()

    def report(step: int, losses: list[float]) -> None:
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model)
            print(f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                  f"{time.time() - start:.0f}s " + " ".join(f"{k}={v:.2f}" for k, v in acc.items()),
                  flush=True)

    pretrain.train(model, proc, data, recipe, seed=args.seed, desc="probe", on_step=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
