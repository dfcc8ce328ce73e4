import json

import pytest
import torch

from mmdc.data.load import Split
from mmdc.data.scienceqa import read_scienceqa
from mmdc.generation import Request, generate
from mmdc.models.load import TOY_DIR, count_parameters, load_model, vocab_report
from mmdc.toy import models as toy
from mmdc.toy.build import MANIFEST, VISION, expected_manifest, expected_vision_manifest


def test_plain_transformers_checkpoint_loads_and_generates(plain_llava, synth_root):
    loaded = load_model(str(plain_llava), device="cpu")
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    split = Split("test", synth_root, read_scienceqa(synth_root, "test")[:4])
    reqs = [Request("Question: x", split.image(i)) for i in split.instances]
    outs = generate(loaded.model, loaded.processor, reqs, max_new_tokens=3, progress=False)
    assert len(outs) == 4 and all(isinstance(o, str) for o in outs)


def test_toy_builder_round_trips_through_auto_classes(tmp_path):
    tok = toy.build_tokenizer()
    assert toy.build_tokenizer().get_vocab() == tok.get_vocab()  # deterministic
    spec = toy.STUDENT_SPEC
    model = toy.build_model(spec, tok)
    toy.build_processor(tok).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "generation_config.json"} <= names
    loaded = load_model(str(tmp_path), device="cpu")
    assert count_parameters(loaded.model) == count_parameters(model)
    assert loaded.processor.num_additional_image_tokens == 1
    assert loaded.processor.chat_template == toy.CHAT_TEMPLATE


def test_vision_position_table_encodes_rows_and_columns():
    """The toy vision tower starts with a 2-D sin-cos table: the class token is zero,
    patches in one row share the row half of the channels, patches in one column the
    column half, and the table has the spec's scale."""
    spec = toy.VISION_SPEC
    tower = toy.build_vision_tower(spec)
    table = tower.embeddings.position_embedding.weight.detach()
    assert table.shape == (1 + (spec.image_size // spec.patch_size) ** 2, spec.hidden)
    assert table[0].abs().max() == 0
    grid = spec.image_size // spec.patch_size
    half = spec.hidden // 2
    patches = table[1:].reshape(grid, grid, -1)
    rows, cols = patches[..., :half], patches[..., half:]
    assert torch.allclose(rows[1, 0], rows[1, 3]) and not torch.allclose(rows[0, 0], rows[1, 0])
    assert torch.allclose(cols[0, 2], cols[3, 2]) and not torch.allclose(cols[0, 0], cols[0, 1])
    assert abs(table[1:].std().item() - spec.position_std) < 1e-3


def test_teacher_and_student_share_the_tower_and_the_student_is_much_smaller():
    """Both are assembled on one tower (its tensors copied in unchanged); as LLaVA-1.5-7B
    against 13B (0.54 of the parameters), the student has at most 60% of the teacher's
    parameters and at most half of its language model's."""
    tok = toy.build_tokenizer()
    tower = toy.build_vision_tower(seed=3)
    teacher = toy.build_model(toy.TEACHER_SPEC, tok, tower=tower)
    student = toy.build_model(toy.STUDENT_SPEC, tok, tower=tower)
    for model in (teacher, student):
        mine = model.model.vision_tower.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in tower.state_dict().items())
    assert count_parameters(student) * 5 <= count_parameters(teacher) * 3
    lm = [count_parameters(m.model.language_model) for m in (teacher, student)]
    assert lm[1] * 2 <= lm[0]


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_shipped_toy_checkpoints_match_current_builder(role):
    """The shipped checkpoints were built by the current recipe, tokenizer and configs,
    on the shipped tower, whose tensors they carry unchanged."""
    from safetensors.torch import load_file

    folder = TOY_DIR / role
    assert (folder / "model.safetensors").is_file(), "run: mmdc models build-toy"
    tok = toy.build_tokenizer()
    manifest = json.loads((folder / MANIFEST).read_text())
    want = json.loads(json.dumps(expected_manifest(role, tok, TOY_DIR / VISION)))
    for key in want:
        assert manifest[key] == want[key], f"{role} {key} is stale: run mmdc models build-toy --force"
    spec = toy.TEACHER_SPEC if role == "teacher" else toy.STUDENT_SPEC
    shipped = json.loads((folder / "config.json").read_text())
    built = toy.build_config(spec, tok).to_dict()
    for section in ("text_config", "vision_config"):
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            if key in built[section]:
                assert shipped[section][key] == built[section][key], (section, key)
    loaded = load_model(f"builtin:{role}", device="cpu")
    assert loaded.tokenizer.get_vocab() == tok.get_vocab()
    tower = load_file(TOY_DIR / VISION / "model.safetensors")
    mine = loaded.model.model.vision_tower.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in tower.items())


def test_shipped_vision_tower_matches_current_objective():
    from transformers import CLIPVisionModel

    manifest = json.loads((TOY_DIR / VISION / MANIFEST).read_text())
    want = json.loads(json.dumps(expected_vision_manifest()))
    for key in want:
        assert manifest[key] == want[key], f"vision {key} is stale: run mmdc models build-toy --force"
    tower = CLIPVisionModel.from_pretrained(TOY_DIR / VISION, local_files_only=True)
    assert tower.config.hidden_size == toy.VISION_SPEC.hidden
    acc = manifest["pretraining"]["heldout_acc"]
    assert min(acc[k] for k in ("content", "color", "shape", "pole", "row", "col")) >= 99.0
    assert min(acc.values()) >= 95.0


def test_shipped_checkpoints_are_small_safetensors():
    # teacher 7.0 MB, student 4.0 MB, vision tower 1.0 MB (float32 safetensors) and their
    # configs and tokenizers: anything much larger is a file that should not ship
    files = [p for p in TOY_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 14 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl")]


def test_vocabulary_sharing_is_reported(plain_llava):
    rep = vocab_report("builtin:teacher", "builtin:student")
    assert rep["shared_vocabulary"] is True
    rep = vocab_report("builtin:teacher", str(plain_llava))
    assert rep["shared_vocabulary"] is False


def test_generation_splits_a_batch_that_runs_out_of_memory(caplog):
    """An out-of-memory batch is halved and retried, with a warning, and the outputs are
    the same as without the fault; out of memory on a single request is one clear error."""
    from PIL import Image

    from mmdc.errors import ModelError
    from mmdc.generation import Request, generate
    from mmdc.models.load import load_model

    loaded = load_model("builtin:student", device="cpu")
    reqs = [Request(f"Question: How many shapes? {i}", Image.new("RGB", (32, 32), "white"))
            for i in range(5)]
    want = generate(loaded.model, loaded.processor, reqs, max_new_tokens=4, batch_size=8)
    real = loaded.model.generate

    def small_memory(limit):
        def fake(**kw):
            if kw["input_ids"].shape[0] > limit:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(**kw)
        return fake

    loaded.model.generate = small_memory(2)
    with caplog.at_level("WARNING"):
        got = generate(loaded.model, loaded.processor, reqs, max_new_tokens=4, batch_size=8)
    assert got == want
    assert "out of memory generating a batch of 5" in caplog.text
    loaded.model.generate = small_memory(0)
    with pytest.raises(ModelError, match="out of memory generating one request"):
        generate(loaded.model, loaded.processor, reqs, max_new_tokens=4, batch_size=8)


def test_static_cache_gives_the_dynamic_cache_greedy_outputs(synth_root):
    """The static KV cache (fixed shapes, prompts padded to a bucket) decodes greedily to
    the same texts as the plain path, text-only and with images, in mixed-length batches."""
    from mmdc.config import ModelConfig
    from mmdc.data.prompts import build_prompt
    from mmdc.models.load import load_configured

    loaded = load_configured(ModelConfig(path="builtin:teacher", device="cpu", cache="static"))
    assert loaded.cache == "static"
    split = Split("test", synth_root, read_scienceqa(synth_root, "test")[:6])
    reqs = [Request(build_prompt(inst, fmt), split.image(inst) if n % 2 else None)
            for fmt in ("CQM-A", "CQM-LEA") for n, inst in enumerate(split.instances)]
    plain = generate(loaded.model, loaded.processor, reqs, max_new_tokens=12, batch_size=4,
                     progress=False)
    static = loaded.generate(reqs, max_new_tokens=12, batch_size=4, progress=False, bucket=16)
    assert static == plain and any(plain)


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-next-7b"])
def test_real_shapes_build_at_tiny_scale_and_generate(name):
    """The real-shape builder (benchmarks/real_scale.py) makes a LLaVA of the named
    family; scaled down, it runs through the project's own generate."""
    from PIL import Image

    from mmdc.models.shapes import SHAPES, build

    model, processor = build(SHAPES[name], scale=64)
    assert type(model).__name__.startswith(SHAPES[name].architecture)
    reqs = [Request("Question: what is shown?", Image.new("RGB", (80, 60), "red")),
            Request("Question: two plus two?", None)]
    outs = generate(model, processor, reqs, max_new_tokens=3, progress=False)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def test_real_shapes_have_the_published_parameter_counts():
    """Built on the meta device (no memory): LLaVA-1.5-7B has 7.06B parameters, -13B
    13.35B, as the published checkpoints."""
    from mmdc.models.shapes import SHAPES, build

    for name, want in (("llava-1.5-7b", 7.06e9), ("llava-1.5-13b", 13.35e9),
                       ("llava-next-7b", 7.06e9)):
        model, _ = build(SHAPES[name], device="meta")
        assert abs(count_parameters(model) / want - 1) < 0.002, name
