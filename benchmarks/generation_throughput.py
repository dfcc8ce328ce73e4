"""Batched vs one-at-a-time teacher generation, on the same instances, in one run.

Both paths are :func:`mmdc.generation.generate` (greedy, KV cache): batched uses left
padding and length-sorted batches, one-at-a-time uses ``batch_size=1``. Prints
instances/s, generated tokens/s, the ratio, and how many outputs are identical.

    python benchmarks/generation_throughput.py [--n 64] [--batch-size 64] [--task answer|write]
        [--cache dynamic|static]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from mmdc.config import load_config
from mmdc.data.load import load_split
from mmdc.data.prompts import build_prompt, build_write_prompt
from mmdc.generation import Request, generate
from mmdc.models.load import load_model
from mmdc.toy import world
from mmdc.toy.task import prepare_data


def write_requests(seeds: list) -> list[Request]:
    """Ask for a new instance like each seed, about a fresh image of the seed's skill."""
    rng = random.Random(0)
    return [Request(build_write_prompt(seed, "same"),
                    world.draw_scene(world.scene_for_skill(seed.skill, rng))
                    if seed.image is not None else None) for seed in seeds]


def requests(task: str, n: int, data_root: str) -> list[Request]:
    cfg = load_config(None, [f"data.root={data_root}"])
    prepare_data(cfg.data)
    split = load_split(cfg.data, cfg.data.test_split)
    insts = split.instances[:n]
    if task == "answer":  # the teacher's CQM-LEA rationale answers (imitate, verify)
        return [Request(build_prompt(i, "CQM-LEA"), split.image(i)) for i in insts]
    return write_requests(insts)  # writing new instances about fresh images (generate)


def timed(model, processor, reqs, batch_size, max_new_tokens, cache="dynamic"):
    start = time.perf_counter()
    outs = generate(model, processor, reqs, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, progress=False, cache=cache)
    return outs, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:teacher")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--task", choices=["answer", "write"], default="answer")
    ap.add_argument("--data-root", default="data/synthetic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                    help="the KV cache (teacher.cache): static pads prompts to a bucket")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    reqs = requests(args.task, args.n, args.data_root)
    tok = loaded.processor.tokenizer
    timed(loaded.model, loaded.processor, reqs[:4], 4, 4, args.cache)  # warm-up
    rows = {}
    outs = {}
    for name, bs in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        outs[name], secs = timed(loaded.model, loaded.processor, reqs, bs, args.max_new_tokens,
                                 args.cache)
        ntok = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs[name])
        rows[name] = (secs, len(reqs) / secs, ntok / secs)
    (single, batched) = rows.values()
    same = sum(a == b for a, b in zip(*outs.values()))
    print(f"{args.model}, {len(reqs)} {args.task} requests, greedy, max_new_tokens "
          f"{args.max_new_tokens}, {args.cache} cache, {args.threads} CPU threads:\n")
    print("| mode | seconds | instances/s | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, (secs, ips, tps) in rows.items():
        print(f"| {name} | {secs:.1f} | {ips:.2f} | {tps:.0f} |")
    print(f"\nbatched / one-at-a-time throughput: {batched[1] / single[1]:.1f}x")
    print(f"identical outputs: {same}/{len(reqs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
