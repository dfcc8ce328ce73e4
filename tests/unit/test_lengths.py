"""Sizes that cannot fit: training rows against ``max_length`` (a LLaVA-1.5-like processor
expands each image into 576 tokens) and generations against the model's positions."""

from pathlib import Path

import pytest

from mmdc.cli import main
from tests.conftest import small_data_overrides


@pytest.fixture(scope="module")
def llava576(tmp_path_factory) -> Path:
    """A tiny LLaVA whose processor resizes images to 336 px with 14 px patches, so one
    image is 576 tokens, as in every LLaVA-1.5 (the toy tokenizer, tiny layers)."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from mmdc.toy.models import CHAT_TEMPLATE, build_tokenizer

    folder = tmp_path_factory.mktemp("llava576")
    tok = build_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"height": 336, "width": 336},
                                              crop_size={"height": 336, "width": 336},
                                              do_center_crop=False),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=336, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=1024,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_row_lengths_are_exact(llava576, synth_root):
    """The counted length of a row equals what the processor makes of it."""
    from mmdc.config import DataConfig
    from mmdc.data.load import load_split
    from mmdc.models.load import load_processor
    from mmdc.training import LengthCounter, sft_rows

    processor = load_processor(str(llava576))
    split = load_split(DataConfig(root=str(synth_root), synth=dict(
        pretrain=0, train=24, pool=8, val=16, test=32)), "train")
    counter = LengthCounter(processor)
    for inst in split.instances[:6]:
        img = split.image(inst)
        (row,) = sft_rows([inst], [img], "CQM-LEA")
        enc = processor.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                            return_dict=True, images=[img] if img else None)
        total, images = counter.row(row)
        assert total == len(enc["input_ids"][0]) + 1  # one token of slack for an added eos
        assert images == (576 if img is not None else 0)


def test_576_image_tokens_train_with_the_default_config(llava576, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["align", f"run_dir={run_dir}", *small_data_overrides(tmp_path / "data"),
            f"student.path={llava576}", "align.train.max_steps=1", "align.train.batch_size=2"]
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    assert (run_dir / "align" / "student" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("command", ["align", "run"])
def test_a_max_length_too_short_is_refused_before_any_work(llava576, tmp_path, capsys,
                                                           command):
    run_dir = tmp_path / "run"
    args = [command, f"run_dir={run_dir}", *small_data_overrides(tmp_path / "data"),
            f"student.path={llava576}", "align.train.max_length=512"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmdc: error: key 'align.train.max_length': 512")
    assert "576 of them image tokens" in err[0]
    assert not (run_dir / "align").exists()
    if command == "run":
        assert not (run_dir / "state.json").exists() and not (run_dir / "baseline").exists()


def test_generation_past_the_positions_is_refused(llava576, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", f"run_dir={run_dir}", *small_data_overrides(tmp_path / "data"),
            f"student.path={llava576}", "eval.max_new_tokens=600"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key 'eval.max_new_tokens': 600 new tokens" in err[0]
    assert "1024 positions" in err[0] and not (run_dir / "state.json").exists()


def test_imitation_rows_that_cannot_fit_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", f"run_dir={run_dir}", *small_data_overrides(tmp_path / "data"),
            "imitate.formats=[CQM-LEA]", "imitate.train.max_length=64"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key 'imitate.train.max_length': 64 is too short" in err[0]
    assert not (run_dir / "state.json").exists()
