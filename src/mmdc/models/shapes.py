"""LLaVA-family checkpoints of real shapes with random weights, built from configs (no
download), for speed and memory measurements: LLaVA-1.5-7B and -13B (CLIP ViT-L/14-336 and
a Vicuna/Llama language model) and LLaVA-NeXT-7B (the same with anyres tiles). ``scale``
divides every width and depth, so the same code runs at tiny dimensions on a CPU.

The tokenizer is the toy one (the hub's Llama tokenizer cannot be downloaded here); the
language model keeps the real vocabulary size, so embedding and output layers have their
real cost.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = 336
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass(frozen=True)
class Shape:
    name: str
    architecture: str  # Llava or LlavaNext
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32064


SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", "Llava", 4096, 11008, 32, 32),
    "llava-1.5-13b": Shape("llava-1.5-13b", "Llava", 5120, 13824, 40, 40),
    "llava-next-7b": Shape("llava-next-7b", "LlavaNext", 4096, 11008, 32, 32),
}


def _div(x: int, scale: int, minimum: int) -> int:
    return max(minimum, x // scale)


def build(shape: Shape, *, scale: int = 1, dtype=None, device: str = "cpu", seed: int = 0):
    """(model, processor) of ``shape`` with random weights, made on ``device`` directly.
    ``scale`` > 1 divides widths, depths and the image size (tiny CPU runs)."""
    heads = _div(shape.heads, scale, 2)
    return llava(
        shape.architecture,
        vision=dict(hidden_size=_div(1024, scale, 32), intermediate_size=_div(4096, scale, 64),
                    num_hidden_layers=_div(24, scale, 2), num_attention_heads=_div(16, scale, 2),
                    projection_dim=_div(768, scale, 32)),
        text=dict(vocab_size=shape.vocab if scale == 1 else None,
                  hidden_size=_div(shape.hidden, scale, 32) // heads * heads,
                  intermediate_size=_div(shape.intermediate, scale, 64),
                  num_hidden_layers=_div(shape.layers, scale, 2), num_attention_heads=heads,
                  num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-5),
        image=IMAGE if scale == 1 else 56,  # 16 image tokens a tile at tiny scale
        patch=14, dtype=dtype, device=device, seed=seed)


def llava(architecture: str, *, vision: dict, text: dict, image: int, patch: int,
          pinpoints: list | None = None, dtype=None, device: str = "cpu", seed: int = 0):
    """(model, processor) of a LLaVA (``Llava``) or LLaVA-NeXT (``LlavaNext``) with a CLIP
    vision tower and a Llama language model of the given config fields, random weights,
    the toy tokenizer (``text["vocab_size"]`` None: the tokenizer's size), as llava-hf
    lays them out. ``pinpoints``: LLaVA-NeXT's tile grid (default: the 1.6 grid scaled to
    ``image``)."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    from mmdc.toy.models import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

    tok = build_tokenizer()
    vision_config = CLIPVisionConfig(image_size=image, patch_size=patch, **vision)
    text_config = LlamaConfig(**{**text, "vocab_size": text.get("vocab_size") or len(tok)},
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    common = dict(vision_config=vision_config, text_config=text_config,
                  image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
    processor_common = dict(tokenizer=tok, patch_size=patch,
                            vision_feature_select_strategy="default",
                            chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
                            num_additional_image_tokens=1)
    sizes = dict(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    if pinpoints is None:
        pinpoints = [[a * image // IMAGE, b * image // IMAGE] for a, b in PINPOINTS]
    old = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            if architecture == "Llava":
                model = LlavaForConditionalGeneration(LlavaConfig(**common))
                processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(**sizes),
                                           **processor_common)
            elif architecture == "LlavaNext":
                model = LlavaNextForConditionalGeneration(
                    LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
                processor = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(
                    image_grid_pinpoints=pinpoints, **sizes), **processor_common)
            else:
                raise ValueError(f"architecture {architecture!r}: Llava or LlavaNext")
    finally:
        torch.set_default_dtype(old)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = (tok.pad_token_id, tok.eos_token_id,
                                                            tok.bos_token_id)
    gen.do_sample = False
    model.eval()
    return model, processor
