import math

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmdc.config import LoraConfigSection, TrainConfig
from mmdc.data.load import Split
from mmdc.data.scienceqa import read_scienceqa
from mmdc.models.load import load_model
from mmdc.toy import models as toy
from mmdc.training import apply_lora, export_merged, sft_rows, train_sft


def test_align_lora_on_language_model_with_projector(synth_root, tmp_path):
    tok = toy.build_tokenizer()
    spec = toy.STUDENT_SPEC
    model = toy.build_model(spec, tok)
    processor = toy.build_processor(tok)
    vision_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    split = Split("train", synth_root, read_scienceqa(synth_root, "train"))
    rows = sft_rows(split.instances, [split.image(i) for i in split.instances])
    peft_model = apply_lora(model, LoraConfigSection(r=4, alpha=8))
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora_names and not [n for n in lora_names if "vision_tower" in n]
    history = train_sft(peft_model, processor, rows, tmp_path / "adapter",
                        TrainConfig(max_steps=4, batch_size=8, logging_steps=1, warmup_steps=1))
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    files = {p.name for p in (tmp_path / "adapter").iterdir() if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("multi_modal_projector" in k for k in keys)
    assert not any("vision_tower" in k for k in keys)
    for k, v in peft_model.base_model.model.model.vision_tower.state_dict().items():
        assert torch.equal(v.cpu(), vision_before[k].cpu()), k  # trained on GPU when there is one
    # the adapter reloads on the base checkpoint, and a merged export loads as plain HF
    base_dir = tmp_path / "base"
    toy.build_model(spec, tok).save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    again = load_model(str(base_dir), adapter=str(tmp_path / "adapter"), device="cpu")
    assert type(again.model).__name__.startswith("PeftModel")
    merged = export_merged(peft_model, processor, tmp_path / "merged")
    plain = load_model(str(merged), device="cpu")
    assert type(plain.model).__name__ == "LlavaForConditionalGeneration"


def test_non_finite_loss_stops_training_and_saves_nothing(synth_root, tmp_path):
    """A diverged loss is a one-line TrainingError naming the output folder; no adapter
    is written, so the previous (good) one stays the run's latest."""
    import pytest
    from trl import SFTTrainer

    from mmdc.errors import TrainingError

    class Diverging(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss * float("nan") if self.state.global_step >= 1 else loss

    tok = toy.build_tokenizer()
    model = toy.build_model(toy.STUDENT_SPEC, tok)
    processor = toy.build_processor(tok)
    split = Split("train", synth_root, read_scienceqa(synth_root, "train"))
    rows = sft_rows(split.instances[:16], [split.image(i) for i in split.instances[:16]])
    peft_model = apply_lora(model, LoraConfigSection(r=4, alpha=8))
    out = tmp_path / "adapter"
    with pytest.raises(TrainingError, match=r"adapter: the training loss became nan by step 2"):
        train_sft(peft_model, processor, rows, out,
                  TrainConfig(max_steps=4, batch_size=8, logging_steps=1, warmup_steps=1),
                  trainer_class=Diverging)
    assert not (out / "adapter_model.safetensors").exists()


def test_out_of_memory_in_training_retries_with_a_smaller_batch(synth_root, tmp_path, caplog):
    """A batch that does not fit: training starts again from the initial adapter with half
    the per-device batch and twice the accumulation (the same global batch), and says so;
    the result equals training at that batch from the start."""
    import torch
    from trl import SFTTrainer

    class SmallMemory(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            if self.args.per_device_train_batch_size > 2 and self.state.global_step >= 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().training_step(model, inputs, *args, **kwargs)

    tok = toy.build_tokenizer()
    processor = toy.build_processor(tok)
    split = Split("train", synth_root, read_scienceqa(synth_root, "train"))
    rows = sft_rows(split.instances[:16], [split.image(i) for i in split.instances[:16]])

    def train(batch, accum, out, trainer_class=None):
        torch.manual_seed(0)
        peft_model = apply_lora(toy.build_model(toy.STUDENT_SPEC, tok),
                                LoraConfigSection(r=4, alpha=8))
        history = train_sft(peft_model, processor, rows, out, TrainConfig(
            max_steps=3, batch_size=batch, grad_accum=accum, logging_steps=1, warmup_steps=1),
            trainer_class=trainer_class)
        return history, load_file(out / "adapter_model.safetensors")

    with caplog.at_level("WARNING"):
        _, got = train(8, 1, tmp_path / "retried", SmallMemory)
    msgs = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(msgs) == 2 and "retrying from the start with 4 x 2" in msgs[0]
    assert "2 x 4" in msgs[1]
    _, want = train(2, 4, tmp_path / "direct")
    assert got.keys() == want.keys()
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
