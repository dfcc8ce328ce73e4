"""Confirm mmdc on a GPU machine: a short bf16 run of the pipeline and generation speed.

    python scripts/gpu_check.py                       # the toy models, built-in task
    python scripts/gpu_check.py --model /models/llava-1.5-7b-hf --requests 128

1. ``mmdc run`` on the built-in default for one calibration iteration with teacher and
   student in bfloat16 on the GPU (run folder under --out), its wall time and accuracies;
2. generation speed (new tokens per second) of the ``hf`` backend on CQM-LEA prompts of
   the synthetic task, batch 1 and batched, for the toy teacher or ``--model``;
3. the same through the ``vllm`` backend where vllm is installed.

Prints a table; exits non-zero if anything fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def tokens_per_second(backend, tokenizer, requests, batch_size: int, max_new_tokens: int
                      ) -> tuple[float, float, int]:
    """(new tokens per second, seconds, new tokens) for one pass over ``requests``."""
    import torch

    backend.generate(requests[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = backend.generate(requests, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs)
    return new / seconds, seconds, new


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:teacher", help="checkpoint for the speed test")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--skip-run", action="store_true", help="only the speed test")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 2
    from mmdc.data.prompts import build_prompt
    from mmdc.generation import Request
    from mmdc.models.load import load_model
    from mmdc.toy import world

    rows = [("device", torch.cuda.get_device_name(0)), ("torch", torch.__version__)]
    out = Path(args.out)
    if not args.skip_run:
        from mmdc.cli import main as mmdc

        shutil.rmtree(out / "run", ignore_errors=True)
        start = time.perf_counter()
        rc = mmdc(["run", f"run_dir={out / 'run'}", f"data.root={out / 'data'}",
                   "loop.iterations=1", "teacher.dtype=bfloat16", "student.dtype=bfloat16",
                   "teacher.device=cuda", "student.device=cuda"])
        if rc != 0:
            print(f"gpu_check: mmdc run failed (exit {rc})", file=sys.stderr)
            return 1
        metrics = json.loads((out / "run" / "iter_1" / "metrics.json").read_text())
        rows += [("bf16 run, 1 iteration: wall s", f"{time.perf_counter() - start:.1f}"),
                 ("  teacher test accuracy", f"{metrics['teacher']['columns']['Avg']['acc']:.2f}"),
                 ("  student test accuracy", f"{metrics['student']['columns']['Avg']['acc']:.2f}")]

    requests = [Request(build_prompt(inst, "CQM-LEA"), img)
                for inst, img in world.generate_split("test", args.requests, 0)]
    loaded = load_model(args.model, dtype="bfloat16", device="cuda")
    tok = loaded.processor.tokenizer
    for bs in (1, args.batch_size):
        n = requests if bs > 1 else requests[:32]
        tps, sec, new = tokens_per_second(loaded, tok, n, bs, args.max_new_tokens)
        rows.append((f"hf backend, batch {bs}: new tokens/s", f"{tps:,.0f} ({new} in {sec:.2f} s)"))
    del loaded
    try:
        import vllm  # noqa: F401
    except ImportError:
        rows.append(("vllm backend", "not installed (pip install 'mmdc[vllm]')"))
    else:
        from mmdc.models.backends import VLLMBackend

        backend = VLLMBackend(args.model, dtype="bfloat16", gpu_memory_utilization=0.5)
        tps, sec, new = tokens_per_second(backend, backend.processor.tokenizer, requests,
                                          args.batch_size, args.max_new_tokens)
        rows.append(("vllm backend: new tokens/s", f"{tps:,.0f} ({new} in {sec:.2f} s)"))

    width = max(len(k) for k, _ in rows)
    print(f"\n{'check'.ljust(width)} | result\n{'-' * width}-|-------")
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
