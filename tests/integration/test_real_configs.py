"""The shipped real-model configs, each run through its architecture at tiny dimensions
(built here with plain transformers, saved in the llava-hf layout, no downloads): the
teacher answers through the configured backend, and the student takes one LoRA imitate
step with the config's LoRA and training settings."""

import math
import re
from pathlib import Path

import pytest

from mmdc.config import load_config
from tests.conftest import MINI, ROOT

CONFIGS = ROOT / "configs"
# each real-model config and the architecture its "# architecture:" line names
REAL = {
    "llava15_13b_to_7b_scienceqa.yaml": "LlavaForConditionalGeneration",
    "llava_next_vicuna_13b_to_7b_scienceqa.yaml": "LlavaNextForConditionalGeneration",
}
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def test_every_real_model_config_is_covered():
    shipped = {p.name for p in CONFIGS.glob("*.yaml")} - {"default.yaml"}
    assert shipped == set(REAL)
    for name, arch in REAL.items():
        header = (CONFIGS / name).read_text().splitlines()[:4]
        assert any(re.match(rf"# architecture: {arch}\b", line) for line in header), name


def build_tiny(arch: str, folder: Path, hidden: int, layers: int) -> Path:
    """A tiny checkpoint of ``arch``: CLIP vision tower + Llama, as llava-hf ships them."""
    from mmdc.models.shapes import llava

    model, proc = llava(
        arch.removesuffix("ForConditionalGeneration"),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, projection_dim=32),
        text=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048),
        image=32, patch=8, pinpoints=PINPOINTS)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_runs_its_architecture_at_tiny_dimensions(name, tmp_path):
    from PIL import Image

    from mmdc.data.prompts import build_target
    from mmdc.data.scienceqa import read_scienceqa
    from mmdc.generation import Request
    from mmdc.roles import student_model as _student
    from mmdc.roles import teacher_backend as _teacher
    from mmdc.roles import train_role as _train_role
    from mmdc.stages.imitate import answer_pool
    from mmdc.training import sft_rows

    arch = REAL[name]
    teacher = build_tiny(arch, tmp_path / "teacher", hidden=64, layers=2)
    student = build_tiny(arch, tmp_path / "student", hidden=32, layers=1)
    cfg = load_config(CONFIGS / name, [
        f"run_dir={tmp_path / 'run'}", f"data.root={MINI}", f"teacher.path={teacher}",
        f"student.path={student}", "teacher.device=cpu", "student.device=cpu",
        "imitate.train.max_steps=1", "imitate.train.batch_size=2",
        "imitate.train.logging_steps=1"])
    assert cfg.teacher.dtype == cfg.student.dtype == "bfloat16"  # as shipped
    instances = [i for i in read_scienceqa(MINI, "test") if i.choices][:4]
    images = [Image.open(MINI / i.image).convert("RGB") if i.image else None
              for i in instances]
    assert any(img is not None for img in images) and any(img is None for img in images)
    rows = answer_pool(_teacher(cfg, None, tmp_path / "run"), instances, images,
                       max_new_tokens=cfg.imitate.max_new_tokens // 32, batch_size=4)
    assert [r["id"] for r in rows] == [i.id for i in instances]
    # a random tiny teacher writes no parsable answer: the student imitates reference ones
    targets = [build_target(i, "CQM-LEA") for i in instances]
    out = tmp_path / "run" / "iter_1" / "student_adapter"
    losses = _train_role(cfg, cfg.student, sft_rows(instances, images, "CQM-LEA", targets),
                         None, out, tmp_path / "tb", cfg.imitate.train)
    assert losses and all(math.isfinite(x) for x in losses)
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and "language_model" in k for k in weights)
    assert not any("vision_tower" in k for k in weights)  # the config's LoRA pattern
    # the adapted student answers through the same path the loop uses
    answers = _student(cfg, str(out)).generate(
        [Request("Which?", img)
         for img in images[:2]], max_new_tokens=4)
    assert len(answers) == 2
