"""Shared fixtures: a small synthetic task on disk and a tiny LLaVA checkpoint built with
plain transformers and tokenizers (not the project's own builder)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmdc.toy.task import write_synthetic_task
from mmdc.toy.world import TaskSizes

ROOT = Path(__file__).resolve().parent.parent  # the repository
DATA = Path(__file__).resolve().parent / "data"
MINI = DATA / "scienceqa_mini"
# the calibration loop at its smallest: one iteration, a few steps of each stage
TINY = ["loop.iterations=1", "align.train.max_steps=3", "align.train.batch_size=8",
        "imitate.train.max_steps=3", "imitate.train.batch_size=8", "generate.per_iteration=4",
        "verify.k=2", "imitate.max_new_tokens=40", "generate.max_new_tokens=80",
        "improve.enabled=false"]  # the self-improving teacher has tests of its own
SMALL = TaskSizes(pretrain=0, train=24, pool=8, val=16, test=32)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return write_synthetic_task(root, SMALL, seed=0)


def free_port() -> int:
    """A free loopback TCP port (for a test's server or torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_data_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.synth.pretrain=0", "data.synth.train=24",
            "data.synth.pool=8", "data.synth.val=16", "data.synth.test=32"]


@pytest.fixture(scope="session")
def plain_llava(tmp_path_factory) -> Path:
    """A LLaVA checkpoint folder made only with transformers/tokenizers calls, in the
    llava-hf layout (config.json, model.safetensors, processor + tokenizer files)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    folder = tmp_path_factory.mktemp("plain-llava")
    words = set()
    for text in ["USER: ASSISTANT: Context: N/A Question: Options: Answer with the option's "
                 "letter from the given choices directly. (A) (B) (C) (D) A B C D"]:
        words.update(re.findall(r"\w+|[^\w\s]", text))
    problems = json.loads((MINI /
                           "problems.json").read_text(encoding="utf-8"))
    for p in problems.values():
        for t in [p["question"], p["hint"], *p["choices"]]:
            words.update(re.findall(r"\w+|[^\w\s]", t))
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>",
                                         *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: "
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"height": 32, "width": 32},
                                              do_center_crop=False),
        tokenizer=fast, patch_size=16, vision_feature_select_strategy="default",
        chat_template=template, num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2),
        image_token_id=vocab["<image>"], vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def mini(tmp_path) -> Path:
    """A writable copy of the ScienceQA-layout sample (text-only and unicode problems)."""
    import shutil

    root = tmp_path / "sqa"
    shutil.copytree(MINI, root)
    return root


def edit_problem(root: Path, pid: str, **changes) -> None:
    p = json.loads((root / "problems.json").read_text(encoding="utf-8"))
    p[pid].update(changes)
    (root / "problems.json").write_text(json.dumps(p, ensure_ascii=False), encoding="utf-8")
