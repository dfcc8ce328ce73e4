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
from dataclasses import dataclass, replace

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mmdc.data.prompts import build_prompt, build_target, format_written, write_instruction
from mmdc.toy import world
from mmdc.toy.world import vqa_answer, vqa_prompt

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
class VisionSpec:
    """The toy CLIP vision tower, shared by teacher and student (LLaVA-1.5 7B and 13B
    share one CLIP ViT-L/336 the same way). One 8x8 patch per cell of the 4x4 grid."""

    hidden: int = 96
    layers: int = 2
    heads: int = 4
    patch_size: int = 8
    image_size: int = world.IMAGE_SIZE
    position_std: float = 2.0  # scale of the 2-D sin-cos position table


@dataclass(frozen=True)
class ToySpec:
    """The language model of a tiny LLaVA (the projector maps the tower's features to
    ``text_hidden``)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int


VISION_SPEC = VisionSpec()
TEACHER_SPEC = ToySpec(text_hidden=192, text_layers=3, text_heads=4, text_intermediate=512)
STUDENT_SPEC = ToySpec(text_hidden=128, text_layers=3, text_heads=4, text_intermediate=384)


def _layout1_write_prompt(inst, mode: str) -> str:
    """The writing prompt of written layout 1, kept for :func:`tokenizer_corpus` only."""
    return f"Seed question: {inst.question}\n{write_instruction(inst, mode)}"


def tokenizer_corpus(seed: int = 0, n_per_skill: int = 300) -> list[str]:
    """Every kind of text the toy models read or write, drawn from the synthetic task."""
    rng = random.Random(f"mmdc-tokenizer-{seed}")
    texts = []
    for skill in world.SKILL_NAMES:
        for i in range(n_per_skill):
            inst = world.make_instance(skill, rng, f"tok-{skill}-{i}", "pretrain")
            texts += [
                f"USER: {vqa_prompt(inst)} ASSISTANT: {vqa_answer(inst)}",
                f"USER: {build_prompt(inst, 'CQM-A')} ASSISTANT: {build_target(inst, 'CQM-A')}",
                f"USER: {build_prompt(inst, 'CQM-LEA')} ASSISTANT: "
                f"{build_target(inst, 'CQM-LEA')}",
                # the writing task as it was when the vocabulary was built (written
                # layout 1: no context line, the seed question alone): the vocabulary,
                # and the student built on it, predate layouts 2 and 3 (their words are
                # in the prompts above, or split into known pieces)
                f"USER: {_layout1_write_prompt(inst, 'same')} ASSISTANT: "
                f"{format_written(replace(inst, context=''))}",
                f"USER: {_layout1_write_prompt(inst, 'rarer')}",
            ]
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


def build_image_processor(vision: VisionSpec = VISION_SPEC) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        do_center_crop=False,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, vision: VisionSpec = VISION_SPEC
                    ) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(vision), tokenizer=tokenizer,
        patch_size=vision.patch_size, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )


def vision_config(vision: VisionSpec = VISION_SPEC) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=vision.hidden, intermediate_size=4 * vision.hidden,
        num_hidden_layers=vision.layers, num_attention_heads=vision.heads,
        image_size=vision.image_size, patch_size=vision.patch_size, projection_dim=vision.hidden,
    )


def build_config(spec: ToySpec, tokenizer: PreTrainedTokenizerFast,
                 vision: VisionSpec = VISION_SPEC) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_heads,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision_config(vision), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=True,
    )


def sincos_position_table(vision: VisionSpec = VISION_SPEC):
    """A 2-D sine-cosine position table for the vision tower (as in MAE), scaled to
    ``vision.position_std``: row and column each take half the channels, so where a patch
    is sits near-linearly in its features from the first step. Row 0 is the class token
    and stays zero."""
    import torch

    grid = vision.image_size // vision.patch_size
    quarter = vision.hidden // 4
    omega = 1.0 / (grid ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def axis(pos):
        angles = pos.reshape(-1, 1).float() * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([axis(rows), axis(cols)], dim=1)
    table = torch.nn.functional.pad(table, (0, vision.hidden - table.shape[1]))
    table = table - table.mean(dim=0, keepdim=True)
    table = table / table.std() * vision.position_std
    return torch.cat([torch.zeros(1, vision.hidden), table], dim=0)


def build_vision_tower(vision: VisionSpec = VISION_SPEC, seed: int = 0) -> CLIPVisionModel:
    """A fresh toy CLIP vision tower: HF's init, with the 2-D sin-cos position table."""
    import torch

    torch.manual_seed(seed)
    tower = CLIPVisionModel(vision_config(vision))
    with torch.no_grad():
        tower.embeddings.position_embedding.weight.copy_(
            sincos_position_table(vision))
    return tower


def build_model(spec: ToySpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                tower: CLIPVisionModel | None = None, vision: VisionSpec = VISION_SPEC
                ) -> LlavaForConditionalGeneration:
    """A tiny LLaVA on ``tower`` (its weights are copied in; a fresh tower when None)."""
    import torch

    if tower is None:
        tower = build_vision_tower(vision, seed)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(spec, tokenizer, vision))
    model.model.vision_tower.load_state_dict(tower.state_dict())
    # HF initialises the projector like a text layer (std 0.02); fan-in scaling lets the
    # tower's features reach the language model at full strength from the first step.
    for layer in (model.model.multi_modal_projector.linear_1,
                  model.model.multi_modal_projector.linear_2):
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
        torch.nn.init.zeros_(layer.bias)
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    return model
