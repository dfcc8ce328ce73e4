"""Tiny LLaVA-architecture models for the built-in default, built fully offline.

A toy checkpoint is exactly what a llava-hf checkpoint is: a ``LlavaForConditionalGeneration``
(CLIP vision tower, two-layer projector, Llama language model) and a ``LlavaProcessor``
(CLIP image processor, fast tokenizer, chat template) saved with ``save_pretrained``. The
tokenizer is a byte-level BPE trained on the synthetic task's own text. Nothing here is
special-cased at load time: :func:`mmdc.models.load.load_model` reads these folders the
same way it reads ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mmdc.data import synthetic
from mmdc.prompts import build_prompt, build_target, build_write_prompt, format_written

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
TOKENIZER_VOCAB = 640

# The llava-1.5 conversation layout: "USER: <image>\n{prompt} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ToySpec:
    """Dimensions of a tiny LLaVA."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    patch_size: int = 8
    image_size: int = synthetic.IMAGE_SIZE
    position_std: float = 2.0  # scale of the 2-D sin-cos vision position table


TEACHER_SPEC = ToySpec(vision_hidden=96, vision_layers=2, vision_heads=4, text_hidden=192,
                       text_layers=3, text_heads=4, text_intermediate=512)
STUDENT_SPEC = ToySpec(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=56,
                       text_layers=2, text_heads=2, text_intermediate=112)


def tokenizer_corpus(seed: int = 0, n_per_skill: int = 300) -> list[str]:
    """Every kind of text the toy models read or write, drawn from the synthetic task."""
    rng = random.Random(f"mmdc-tokenizer-{seed}")
    texts = []
    for skill in synthetic.SKILL_NAMES:
        for i in range(n_per_skill):
            inst = synthetic.make_instance(skill, rng, f"tok-{skill}-{i}", "pretrain")
            texts += [
                f"USER: {build_prompt(inst, 'CQM-A')} ASSISTANT: {build_target(inst, 'CQM-A')}",
                f"USER: {build_prompt(inst, 'CQM-LEA')} ASSISTANT: "
                f"{build_target(inst, 'CQM-LEA')}",
                f"USER: {build_write_prompt(inst, 'same')} ASSISTANT: {format_written(inst)}",
                f"USER: {build_write_prompt(inst, 'rarer')}",
            ]
            if inst.meta.get("scene"):
                texts.append(f"USER: {synthetic.CAPTION_PROMPT} ASSISTANT: "
                             f"{synthetic.describe_scene(inst.meta['scene'])}")
    return texts


def build_tokenizer(seed: int = 0, vocab_size: int = TOKENIZER_VOCAB) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the synthetic corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left", model_max_length=512,
    )
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: ToySpec) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=False,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )


def build_config(spec: ToySpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_heads,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=True,
    )


def sincos_position_table(spec: ToySpec):
    """A 2-D sine-cosine position table for the vision tower (as in MAE), scaled to
    ``spec.position_std``: row and column each take half the channels, so where a patch
    is sits near-linearly in its features from the first step. Row 0 is the class token
    and stays zero."""
    import torch

    grid = spec.image_size // spec.patch_size
    quarter = spec.vision_hidden // 4
    omega = 1.0 / (grid ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def axis(pos):
        angles = pos.reshape(-1, 1).float() * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([axis(rows), axis(cols)], dim=1)
    table = torch.nn.functional.pad(table, (0, spec.vision_hidden - table.shape[1]))
    table = table - table.mean(dim=0, keepdim=True)
    table = table / table.std() * spec.position_std
    return torch.cat([torch.zeros(1, spec.vision_hidden), table], dim=0)


def build_model(spec: ToySpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0
                ) -> LlavaForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(spec, tokenizer))
    # HF initialises the projector like a text layer (std 0.02), which suits a projector
    # fed by a *pretrained* CLIP. From scratch that leaves image tokens ~100x smaller
    # than their signal needs and vision learns very slowly: use fan-in scaling instead.
    for layer in (model.model.multi_modal_projector.linear_1,
                  model.model.multi_modal_projector.linear_2):
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
        torch.nn.init.zeros_(layer.bias)
    # HF's random position init (std 0.02) also starts "where" far below "what": a fixed
    # 2-D sin-cos table makes the map skills (rows, columns, regions) learnable early.
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.copy_(
            sincos_position_table(spec))
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    return model
