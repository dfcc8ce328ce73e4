"""Batched generation with a Hugging Face image-text-to-text model.

Requests are grouped by whether they carry an image, sorted by prompt length, padded on
the left and decoded with the KV cache; results come back in request order. A batch that
runs out of memory is split in two and retried (with a warning), down to single requests.

``cache="static"`` decodes with transformers' static KV cache (preallocated, so the
decoding step has fixed shapes; on CUDA transformers then compiles that step with
``torch.compile``), prompts padded on the left to a multiple of ``bucket`` tokens so that
few distinct shapes, and compilations, occur. Greedy outputs equal the dynamic cache's.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from accelerate.utils.memory import release_memory, should_reduce_batch_size
from PIL import Image
from tqdm.auto import tqdm

from mmdc.errors import ModelError

log = logging.getLogger(__name__)


@dataclass
class Request:
    prompt: str  # the user text
    image: Image.Image | None = None
    # the whole prompt already rendered with the chat template (``mmdc serve`` passes a
    # client's conversation this way); when set, ``prompt`` is not templated again
    text: str | None = None


def chat_text(processor, prompt: str, has_image: bool, answer: str | None = None) -> str:
    """Render one user turn (and optionally the assistant's answer) with the chat template."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if answer is not None:
        text += " " + answer
    return text


def encode_batch(processor, requests: list[Request], padding_side: str = "left",
                 pad_to_multiple_of: int | None = None) -> dict:
    texts = [r.text if r.text is not None else chat_text(processor, r.prompt, r.image is not None)
             for r in requests]
    images = [r.image.convert("RGB") for r in requests if r.image is not None]
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        extra = {"pad_to_multiple_of": pad_to_multiple_of} if pad_to_multiple_of else {}
        enc = processor(text=texts, images=images or None, padding=True, return_tensors="pt",
                        add_special_tokens=False, **extra)
    finally:
        tokenizer.padding_side = old_side
    return dict(enc)


def _generate_batch(model, processor, requests: list[Request], device, dtype, kwargs,
                    bucket: int | None = None) -> list[str]:
    enc = encode_batch(processor, requests, pad_to_multiple_of=bucket)
    enc = {k: v.to(device) for k, v in enc.items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(dtype)
    out = model.generate(**enc, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def plan_batches(requests: list[Request], batch_size: int) -> list[list[int]]:
    """The batches ``generate`` runs, as request indices: requests with and without an
    image apart, each sorted by prompt length, cut into ``batch_size`` groups."""
    order = sorted(range(len(requests)),
                   key=lambda i: (requests[i].image is None, len(requests[i].prompt)))
    batches: list[list[int]] = []
    for i in order:
        if (batches and len(batches[-1]) < batch_size
                and (requests[batches[-1][0]].image is None) == (requests[i].image is None)):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def generate(model, processor, requests: list[Request], *, max_new_tokens: int = 16,
             batch_size: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, desc: str | None = None,
             progress: bool = True, cache: str = "dynamic", bucket: int = 64) -> list[str]:
    """Generate one completion per request; returns decoded texts in request order.
    ``cache``: ``dynamic`` (grows as it decodes) or ``static`` (preallocated, prompts
    padded to a multiple of ``bucket`` tokens; compiled on CUDA)."""
    if not requests:
        return []
    if do_sample and temperature <= 0:  # temperature 0 means greedy, as in the OpenAI API
        do_sample = False
    tokenizer = processor.tokenizer
    batches = plan_batches(requests, batch_size)
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    outputs: list[str] = [""] * len(requests)
    bar = tqdm(total=len(requests), desc=desc or "generate", disable=not progress, leave=False)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    queue = list(batches)
    try:
        while queue:
            idx = queue.pop(0)
            try:
                texts = _generate_batch(model, processor, [requests[i] for i in idx], device,
                                        dtype, kwargs, bucket if cache == "static" else None)
            except RuntimeError as exc:
                if not should_reduce_batch_size(exc):
                    raise
                if len(idx) == 1:
                    raise ModelError(
                        f"out of memory generating one request (max_new_tokens="
                        f"{max_new_tokens}) on {device}: use a smaller dtype, fewer new "
                        "tokens or a device with more memory") from None
                half = len(idx) // 2
                log.warning("out of memory generating a batch of %d on %s: retrying it as "
                            "batches of %d and %d", len(idx), device, half, len(idx) - half)
                release_memory()
                queue[:0] = [idx[:half], idx[half:]]
                continue
            for i, t in zip(idx, texts):
                outputs[i] = t
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return outputs


def fingerprint(requests) -> str:
    """A digest of the requests: prompts, rendered texts and image pixels."""
    h = hashlib.sha256()
    for r in requests:
        h.update(r.prompt.encode())
        h.update(b"\0" + (r.text or "").encode() + b"\0")
        if r.image is not None:
            h.update(r.image.mode.encode() + repr(r.image.size).encode())
            h.update(hashlib.sha256(r.image.tobytes()).digest())
        h.update(b"\1")
    return h.hexdigest()
