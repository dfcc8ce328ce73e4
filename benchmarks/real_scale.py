"""Speed at real LLaVA shapes on one device, each figure beside its hardware bound.

Builds LLaVA-1.5-7B, LLaVA-1.5-13B and LLaVA-NeXT-7B shaped models with random weights
from configs (:mod:`mmdc.models.shapes`, no download) and times them through the
project's own code:

* generation, :func:`mmdc.generation.generate` (the ``hf`` backend) with each KV cache
  (dynamic, static), at batch 1, 16 and 64: CQM-LEA prompts with an image, exactly
  ``--new-tokens`` new tokens each (random weights would stop anywhere). The decode step
  is timed apart from the prefill (a 1-token run subtracted) and set against the
  memory-bandwidth bound: a step reads the language model's weights (not the input
  embeddings, not the vision tower) and every sequence's KV cache;
  with ``vllm`` installed, the same requests through the project's ``vllm`` backend;
* LoRA training, :func:`mmdc.training.train_sft` (TRL's SFTTrainer, LoRA r 8, the
  projector in full): tokens/s after two warm-up steps and MFU, at 4 N FLOPs per
  language-model token (forward 2 N, backward 2 N for activations only: the base
  weights are frozen) plus 2 N per vision-tower patch (forward only).

The bounds come from this device, measured first: the bandwidth of a large copy and the
FLOP/s of a large matmul in the model's dtype. ``--tiny`` runs the same code at 1/64 of
every width and depth on a CPU (CI runs it); its ratios say nothing about a GPU.

    python benchmarks/real_scale.py                      # a CUDA device, bf16
    python benchmarks/real_scale.py --tiny               # CPU, float32, seconds
    python benchmarks/real_scale.py --shapes llava-1.5-7b --batches 1 64 --train-steps 12
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmdc.data.prompts import build_prompt
from mmdc.generation import Request, generate
from mmdc.models.shapes import SHAPES, build
from mmdc.toy import world


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure_device(device: str, dtype, tiny: bool) -> dict:
    """This device's copy bandwidth (bytes/s, read + write) and matmul FLOP/s."""
    n = (64 if tiny else 2048) << 20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 3 if tiny else 20
    secs = timed(lambda: [dst.copy_(src) for _ in range(reps)], device)
    bandwidth = 2 * n * reps / secs
    m = 512 if tiny else 8192
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)
    a @ b
    reps = 3 if tiny else 50
    secs = timed(lambda: [a @ b for _ in range(reps)], device)
    return {"bandwidth": bandwidth, "flops": 2 * m**3 * reps / secs}


def parts(model) -> dict:
    """Parameter counts: the language model (without its input embeddings), the
    embeddings, the vision tower, the projector, the output head."""
    inner = model.model

    def count(module):
        return sum(p.numel() for p in module.parameters())

    lm = inner.language_model
    embed = count(lm.embed_tokens)
    return {"lm": count(lm) - embed, "embed": embed, "vision": count(inner.vision_tower),
            "projector": count(inner.multi_modal_projector), "head": count(model.lm_head)}


def instances(n: int) -> list[tuple]:
    """CQM-LEA questions with images from the built-in world (the real prompt format)."""
    out = []
    for inst, image in world.generate_split("test", 4 * n, seed=0):
        if image is not None:
            out.append((inst, image))
        if len(out) == n:
            return out
    raise RuntimeError("not enough image questions")


def requests(n: int) -> list[Request]:
    """CQM-LEA prompts with their images, as the teacher answers them in the loop."""
    return [Request(build_prompt(i, "CQM-LEA"), img) for i, img in instances(n)]


def kv_bytes_per_token(model, dtype) -> int:
    cfg = model.config.text_config
    kv_dim = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return 2 * cfg.num_hidden_layers * kv_dim * torch.finfo(dtype).bits // 8


def bench_generation(model, processor, device, dtype, bounds, args) -> list[dict]:
    from mmdc.training import LengthCounter

    reqs = requests(max(args.batches))
    counter = LengthCounter(processor)
    prompt_len = sum(counter.prompt(r.prompt, r.image) for r in reqs) / len(reqs)
    p = parts(model)
    weight_bytes = (p["lm"] + p["head"]) * torch.finfo(dtype).bits // 8
    kv_token = kv_bytes_per_token(model, dtype)
    new = args.new_tokens
    gen = model.generation_config
    rows = []
    for cache in args.caches:
        for batch in args.batches:
            batch_reqs = reqs[:batch]

            def run(n_new, batch_reqs=batch_reqs, cache=cache, batch=batch):
                gen.min_new_tokens = n_new
                return generate(model, processor, batch_reqs, max_new_tokens=n_new,
                                batch_size=batch, progress=False, cache=cache)

            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            run(new)  # warm-up: kernels, allocator and (static cache on CUDA) compilation
            prefill = timed(lambda run=run: run(1), device)
            total = timed(lambda run=run: run(new), device)
            step = max(total - prefill, 1e-9) / (new - 1)
            context = prompt_len + new / 2  # average tokens in the cache during decoding
            bound_step = (weight_bytes + batch * context * kv_token) / bounds["bandwidth"]
            rows.append({"backend": "hf", "cache": cache, "batch": batch,
                         "prompt_tokens": round(prompt_len), "new_tokens": new,
                         "tokens_per_s": batch * new / total, "prefill_s": prefill,
                         "decode_step_ms": step * 1e3, "bound_step_ms": bound_step * 1e3,
                         "bound_tokens_per_s": batch / bound_step,
                         "ratio": bound_step / step, "peak_gib": peak_gib(device)})
    gen.min_new_tokens = None
    return rows


def bench_vllm(model, processor, args) -> list[dict]:
    """The same requests through the project's vllm backend, from a saved checkpoint."""
    from mmdc.models.backends import VLLMBackend

    reqs = requests(max(args.batches))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        backend = VLLMBackend(folder, dtype="bfloat16")
        tok = processor.tokenizer
        for batch in args.batches:
            backend.generate(reqs[:batch], max_new_tokens=args.new_tokens, progress=False)
            start = time.perf_counter()
            outs = backend.generate(reqs[:batch], max_new_tokens=args.new_tokens,
                                    progress=False)
            secs = time.perf_counter() - start
            ntok = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
            rows.append({"backend": "vllm", "cache": "paged", "batch": batch,
                         "new_tokens": args.new_tokens, "tokens_per_s": ntok / secs})
    return rows


def bench_training(model, processor, device, bounds, args) -> dict:
    from transformers import TrainerCallback

    from mmdc.config import LoraConfigSection, TrainConfig
    from mmdc.training import LengthCounter, apply_lora, sft_rows, train_sft

    steps, batch = args.train_steps, args.train_batch
    pairs = instances(steps * batch)
    rows = sft_rows([i for i, _ in pairs], [img for _, img in pairs], "CQM-LEA")
    counter = LengthCounter(processor)
    lengths = [counter.row(r) for r in rows]
    tokens_per_row = sum(t for t, _ in lengths) / len(lengths)
    image_tokens = lengths[0][1]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **kw):
            sync(device)
            times.append(time.perf_counter())

    model.generation_config.min_new_tokens = None
    peft_model = apply_lora(model, LoraConfigSection(r=8))
    settings = TrainConfig(learning_rate=1e-4, batch_size=batch, max_steps=steps,
                           warmup_steps=0, logging_steps=1,
                           gradient_checkpointing=args.gradient_checkpointing)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(dir=args.scratch) as out:
        train_sft(peft_model, processor, rows, Path(out) / "adapter", settings,
                  logging_dir=Path(out) / "tb", label="real-scale", callbacks=[StepTimer()])
    warm = 2 if steps > 3 else 0
    secs = (times[-1] - times[warm - 1]) if warm else (times[-1] - times[0])
    timed_steps = steps - warm if warm else steps - 1
    tok_s = timed_steps * batch * tokens_per_row / secs
    p = parts(model)
    patches = image_tokens + 1  # CLIP's class token
    flops_row = 4 * (p["lm"] + p["head"]) * tokens_per_row + 2 * p["vision"] * patches
    mfu = timed_steps * batch * flops_row / secs / bounds["flops"]
    return {"steps": steps, "batch": batch, "tokens_per_row": round(tokens_per_row),
            "tokens_per_s": tok_s, "mfu": mfu, "peak_gib": peak_gib(device),
            "gradient_checkpointing": args.gradient_checkpointing}


def peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def print_tables(results: dict) -> None:
    b = results["device"]
    print(f"{results['device_name']}, {results['dtype']}: copy bandwidth "
          f"{b['bandwidth'] / 1e9:.0f} GB/s, matmul {b['flops'] / 1e12:.1f} TFLOP/s "
          f"(measured){' - tiny shapes: the ratios say nothing about a GPU' if results['tiny'] else ''}\n")
    print("| shape | params | backend | cache | batch | prompt | new tokens/s | decode step ms "
          "| bound ms | of bound | peak GiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results["shapes"].items():
        for g in r["generation"]:
            if g["backend"] == "vllm":
                print(f"| {name} | {billions(r['params'])} | vllm | paged | {g['batch']} | "
                      f"| {g['tokens_per_s']:.1f} | | | | |")
                continue
            print(f"| {name} | {billions(r['params'])} | hf | {g['cache']} | {g['batch']} | "
                  f"{g['prompt_tokens']} | {g['tokens_per_s']:.1f} | {g['decode_step_ms']:.2f} "
                  f"| {g['bound_step_ms']:.2f} | {100 * g['ratio']:.0f}% | {g['peak_gib']:.1f} |")
    print("\n| shape | LoRA training | tokens/row | tokens/s | MFU | peak GiB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in results["shapes"].items():
        t = r.get("training")
        if t:
            print(f"| {name} | r 8, batch {t['batch']}, {t['steps']} steps"
                  f"{', checkpointing' if t['gradient_checkpointing'] else ''} | "
                  f"{t['tokens_per_row']} | {t['tokens_per_s']:.0f} | {100 * t['mfu']:.1f}% | "
                  f"{t['peak_gib']:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="1/64 dimensions, CPU, float32")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--caches", nargs="+", default=["dynamic", "static"],
                    choices=["dynamic", "static"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="also time the vllm backend")
    ap.add_argument("--scratch", default=None, help="folder for saved checkpoints (vllm)")
    ap.add_argument("--out", default="runs/real_scale.json")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the decode step is timed apart)")
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda and not args.tiny:
        ap.error("no CUDA device: real shapes need a GPU; --tiny runs them scaled down on CPU")
    results = {"device_name": torch.cuda.get_device_name() if cuda else "CPU",
               "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
               "device": measure_device(device, dtype, args.tiny), "shapes": {}}
    for name in args.shapes:
        model, processor = build(SHAPES[name], scale=64 if args.tiny else 1, dtype=dtype,
                                 device=device)
        r = results["shapes"][name] = {"params": sum(p.numel() for p in model.parameters()),
                                       "parts": parts(model)}
        r["generation"] = bench_generation(model, processor, device, dtype,
                                           results["device"], args)
        if args.vllm:
            try:
                import vllm  # noqa: F401
            except ImportError:
                print("vllm is not installed: its backend is not timed", file=sys.stderr)
            else:
                r["generation"] += bench_vllm(model, processor, args)
        if not args.no_train:
            r["training"] = bench_training(model, processor, device, results["device"], args)
        del model
        if cuda:
            torch.cuda.empty_cache()
    print_tables(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
