"""``mmdc models build-toy`` on tiny recipes: the tower stays frozen through every stage,
a build is deterministic, and a matching build is reused."""

import json
from dataclasses import replace

import pytest
from safetensors.torch import load_file

from mmdc.toy import build, recipe, vision


def tiny_recipes():
    def shrink(r):
        return recipe.Recipe(stages=tuple(
            replace(s, steps=3, warmup=1, examples=48, batch_size=8) for s in r.stages))

    return {"teacher": shrink(recipe.TEACHER_RECIPE), "student": shrink(recipe.STUDENT_RECIPE)}


TINY_VISION = vision.VisionRecipe(steps=3, batch_size=8, warmup=1)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    result = build.build_toy(out, recipes=tiny_recipes(), vision_recipe=TINY_VISION)
    return out, result


def test_tiny_build_keeps_the_tower_frozen_through_every_stage(tiny_build):
    out, result = tiny_build
    tower = load_file(out / build.VISION / "model.safetensors")
    for role in ("teacher", "student"):
        stages = [s["stage"] for s in result[role]["stages"]]
        assert stages == [s.name for s in tiny_recipes()[role].stages]
        weights = load_file(out / role / "model.safetensors")
        for key, value in tower.items():
            mine = weights[f"vision_tower.{key}"]
            assert mine.dtype == value.dtype and bool((mine == value).all()), (role, key)
        assert json.loads((out / role / build.MANIFEST).read_text())["vision"] == \
            build.file_fingerprint(out / build.VISION / "model.safetensors")


def test_tower_check_catches_a_changed_tower(tiny_build):
    out, _ = tiny_build
    from mmdc.models.load import load_model

    model = load_model(str(out / "student"), device="cpu").model
    tower = build.load_tower(out / build.VISION)
    assert build.tower_unchanged(model, tower)
    with __import__("torch").no_grad():
        next(model.model.vision_tower.parameters()).add_(1e-3)
    assert not build.tower_unchanged(model, tower)


def test_build_is_deterministic_and_reused(tiny_build, tmp_path, caplog):
    out, first = tiny_build
    again = build.build_toy(tmp_path, recipes=tiny_recipes(), vision_recipe=TINY_VISION)
    for name in (build.VISION, "teacher", "student"):
        a = (out / name / "model.safetensors").read_bytes()
        b = (tmp_path / name / "model.safetensors").read_bytes()
        assert a == b, f"{name} differs between two builds with the same seed"
    assert again["teacher"]["stages"][0]["final_loss"] == first["teacher"]["stages"][0][
        "final_loss"]
    with caplog.at_level("INFO"):
        reused = build.build_toy(tmp_path, recipes=tiny_recipes(), vision_recipe=TINY_VISION)
    assert reused["student"]["build_seconds"] == again["student"]["build_seconds"]
    assert "already built" in caplog.text
