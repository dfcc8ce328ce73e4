"""The generation journal: a step's in-process generation checkpointed batch by batch, so
a step killed mid-generation and run again produces exactly what an uninterrupted call
would (``RUN_DIR/cache/<step>.journal.jsonl``, removed once the step is recorded).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from mmdc.generation import fingerprint

log = logging.getLogger(__name__)


class Journaled:
    """Checkpoints an in-process (``hf``) backend's generation batch by batch.

    Each finished batch is appended to a JSONL journal with its outputs and the random
    generator's state after it. A step killed mid-generation (SIGKILL, SIGTERM, Ctrl-C)
    and run again replays the journaled batches and resumes sampling from the saved
    state, so it produces exactly what an uninterrupted call would. The batches are
    :func:`mmdc.generation.plan_batches`'s, as in one uninterrupted call. Other backends
    (their own cache) and runs over several processes pass straight through."""

    def __init__(self, inner, path: str | Path, label: str):
        self.inner = inner
        self.path = Path(path)
        self.label = label
        self.name = getattr(inner, "name", "hf")

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def _entries(self, call: str, plan: list[list[int]]) -> dict[int, dict]:
        """This call's journaled batches. A damaged journal (malformed, or an entry not as
        written) is dropped with a warning: the step then generates from its start,
        exactly as an uninterrupted run does."""
        if not self.path.is_file():
            return {}
        from mmdc.data.pool import read_jsonl
        from mmdc.errors import DataError

        try:
            entries = {}
            for e in read_jsonl(self.path):
                if e.get("call") != call:
                    continue
                b = e["batch"]
                if not (0 <= b < len(plan) and len(e["outputs"]) == len(plan[b])
                        and all(isinstance(t, str) for t in e["outputs"])
                        and isinstance(e["rng"]["cpu"], str)):
                    raise ValueError(f"batch {b} is not as written")
                base64.b64decode(e["rng"]["cpu"], validate=True)
                entries[b] = e
            return entries
        except (DataError, AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("%s: damaged journal (%s); dropped: %s generates from its start",
                        self.path, exc, self.label)
            self.path.unlink(missing_ok=True)
            return {}

    def generate(self, requests, *, batch_size: int = 32, seed: int | None = None,
                 desc: str | None = None, progress: bool = True, **kwargs) -> list[str]:
        from mmdc import distributed

        if self.name != "hf" or distributed.world_size() > 1 or not requests:
            return self.inner.generate(requests, batch_size=batch_size, seed=seed, desc=desc,
                                       progress=progress, **kwargs)
        import torch

        from mmdc.data.pool import append_jsonl
        from mmdc.faults import maybe_fail
        from mmdc.generation import plan_batches

        plan = plan_batches(requests, batch_size)
        call = hashlib.sha256(json.dumps(
            [self.label, fingerprint(requests), batch_size, seed, sorted(kwargs.items())],
            default=str).encode()).hexdigest()[:24]
        done = self._entries(call, plan)
        outputs = [""] * len(requests)
        resume = 0
        while resume in done:  # the batches run in order: replay the finished prefix
            for i, t in zip(plan[resume], done[resume]["outputs"]):
                outputs[i] = t
            resume += 1
        if resume:
            log.info("%s: %d of %d batches replayed from %s", self.label, resume, len(plan),
                     self.path)
            state = done[resume - 1]["rng"]
            torch.set_rng_state(torch.tensor(bytearray(base64.b64decode(state["cpu"])),
                                             dtype=torch.uint8))
            if state.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([
                    torch.tensor(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                    for s in state["cuda"]])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(requests), initial=sum(len(plan[b]) for b in range(resume)),
                   desc=desc or self.label, disable=not progress, leave=False)
        try:
            for b in range(resume, len(plan)):
                idx = plan[b]
                texts = self.inner.generate([requests[i] for i in idx], batch_size=len(idx),
                                            seed=seed if b == 0 else None, progress=False,
                                            **kwargs)
                for i, t in zip(idx, texts):
                    outputs[i] = t
                rng = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
                if torch.cuda.is_available():
                    rng["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode()
                                   for s in torch.cuda.get_rng_state_all()]
                append_jsonl(self.path, {"call": call, "batch": b, "outputs": texts,
                                         "rng": rng})
                bar.update(len(idx))
                maybe_fail(f"{self.label}@{b + 1}")
        finally:
            bar.close()
        return outputs


def journal_path(run_dir: Path, step: str) -> Path:
    """Where a step checkpoints its in-process generation, batch by batch."""
    return run_dir / "cache" / (step.replace("/", "-") + ".journal.jsonl")


def journaled(generator, run_dir: Path, step: str, who: str):
    return Journaled(generator, journal_path(run_dir, step), f"{step}:{who}")
