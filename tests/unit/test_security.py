"""What mmdc refuses to trust: pickles, remote code, teacher text as paths."""

import re

from tests.conftest import ROOT


def _sources():
    for folder in ("src", "benchmarks", "scripts"):
        yield from (ROOT / folder).rglob("*.py")


def test_no_pickle_no_unsafe_torch_load_no_eval():
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"
        assert not re.search(r"^\s*import pickle|^\s*from pickle|pickle\.loads?\(", text,
                             re.M), path
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), path


def test_models_load_from_safetensors_and_remote_code_is_off_by_default():
    from mmdc.config import Config

    text = (ROOT / "src/mmdc/models/load.py").read_text()
    assert "use_safetensors=True" in text
    cfg = Config()
    assert cfg.teacher.trust_remote_code is False and cfg.student.trust_remote_code is False


def test_trust_remote_code_is_logged(caplog):
    from mmdc.models.load import load_model

    with caplog.at_level("WARNING"):
        load_model("builtin:student", device="cpu", trust_remote_code=True)
    assert any("trust_remote_code is on" in r.getMessage() for r in caplog.records)


def test_teacher_written_text_never_becomes_a_path():
    """A written instance takes its image from the pool image it was asked about, whatever
    the text says."""
    from mmdc.data.record import Instance
    from mmdc.stages.generate import parse_instance
    from mmdc.stages.seeds import Seed

    seed = Seed(Instance(id="s", question="q", choices=["a", "b"], answer=0, skill="color"),
                "same", "images/pool/p1/image.png")
    text = ("Question: What is in ../../../../etc/passwd?\nOptions: (A) /etc/shadow "
            "(B) images/../../x.png\nAnswer: A\nImage: /etc/passwd\nSolution: see /root")
    inst = parse_instance(text, seed, "gen-1-00000", 1)
    assert inst.image == "images/pool/p1/image.png"
