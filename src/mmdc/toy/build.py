"""Build the toy checkpoints of the built-in default: ``mmdc models build-toy``.

1. ``vision``: the toy CLIP vision tower, pretrained on the world's scenes
   (:mod:`mmdc.toy.vision`) and saved as a plain ``CLIPVisionModel`` folder with its
   image processor;
2. ``teacher`` and ``student``: tiny LLaVAs assembled on that tower, which stays frozen
   (checked tensor by tensor after every stage), trained by their recipes
   (:mod:`mmdc.toy.recipe`) and saved with ``save_pretrained`` (model and processor).

Each folder gets a ``mmdc_toy.json`` manifest: spec, recipe, seed, the tokenizer's and the
tower's fingerprints, parameters and build seconds. A folder whose manifest matches the
current settings is reused unless ``force``. Builds are deterministic: the same seed on
the same machine and thread count gives byte-identical safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mmdc.data.pool import write_json
from mmdc.data.prompts import WRITTEN_LAYOUT
from mmdc.toy import models, recipe, vision

log = logging.getLogger(__name__)

MANIFEST = "mmdc_toy.json"
VISION = "vision"
ROLES = {
    "teacher": (models.TEACHER_SPEC, recipe.TEACHER_RECIPE),
    "student": (models.STUDENT_SPEC, recipe.STUDENT_RECIPE),
}


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def expected_vision_manifest(seed: int = 0, vision_recipe: vision.VisionRecipe | None = None
                             ) -> dict:
    return {"role": VISION, "seed": seed, "spec": asdict(models.VISION_SPEC),
            "recipe": asdict(vision_recipe or vision.VISION_RECIPE),
            "targets": dict(vision.TARGETS)}


def expected_manifest(role: str, tokenizer, tower_dir: Path, seed: int = 0,
                      role_recipe: recipe.Recipe | None = None) -> dict:
    spec, default_recipe = ROLES[role]
    the_recipe = role_recipe or default_recipe
    recorded = asdict(the_recipe)
    if not recorded["seed_letters"]:  # a recipe without them reads as it always did
        del recorded["seed_letters"]
    manifest = {"role": role, "seed": seed, "spec": asdict(spec), "recipe": recorded,
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "vision": file_fingerprint(Path(tower_dir) / "model.safetensors")}
    if any("write" in stage.formats for stage in the_recipe.stages):
        manifest["written_layout"] = WRITTEN_LAYOUT  # a role that learns to write instances
    return manifest


def _matches(folder: Path, want: dict) -> bool:
    path = folder / MANIFEST
    if not path.is_file():
        return False
    have = json.loads(path.read_text())
    want = json.loads(json.dumps(want))  # as it reads back: tuples become lists
    return all(have.get(k) == v for k, v in want.items())


def _save(folder: Path, objects: list, manifest: dict) -> None:
    """Save into ``<folder>.tmp`` and swap it in, so a killed build leaves no half folder."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objects:
        obj.save_pretrained(tmp)
    write_json(tmp / MANIFEST, manifest)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def build_vision(out: Path, seed: int = 0, vision_recipe: vision.VisionRecipe | None = None
                 ) -> dict:
    start = time.time()
    tower = models.build_vision_tower(models.VISION_SPEC, seed)
    image_processor = models.build_image_processor(models.VISION_SPEC)
    stats = vision.pretrain_tower(tower, image_processor, vision_recipe or vision.VISION_RECIPE,
                                  seed=seed)
    manifest = expected_vision_manifest(seed, vision_recipe)
    manifest.update(parameters=sum(p.numel() for p in tower.parameters()),
                    build_seconds=round(time.time() - start, 1), pretraining=stats)
    _save(out, [tower, image_processor], manifest)
    log.info("built the vision tower (%d parameters) in %.0fs -> %s", manifest["parameters"],
             manifest["build_seconds"], out)
    return manifest


def load_tower(tower_dir: Path):
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(tower_dir, local_files_only=True,
                                           use_safetensors=True)


def tower_unchanged(model, tower) -> bool:
    """Whether the LLaVA's vision tower holds exactly the tower's tensors."""
    mine = model.model.vision_tower.state_dict()
    return all(torch.equal(mine[k], v) for k, v in tower.state_dict().items())


def build_role(role: str, out: Path, tokenizer, tower_dir: Path, seed: int = 0,
               role_recipe: recipe.Recipe | None = None) -> dict:
    spec, default_recipe = ROLES[role]
    the_recipe = role_recipe or default_recipe
    start = time.time()
    tower = load_tower(tower_dir)
    processor = models.build_processor(tokenizer, models.VISION_SPEC)
    model = models.build_model(spec, tokenizer, seed=seed, tower=tower)
    model.model.vision_tower.requires_grad_(False)  # LLaVA keeps CLIP frozen
    stages = []
    letters = recipe.seed_letter_sets(the_recipe, seed)
    for stage in the_recipe.stages:
        t0 = time.time()
        data = recipe.tokenize_examples(processor, recipe.build_examples(stage, seed, letters))
        losses = recipe.train(model, processor, data, stage, seed=seed,
                              desc=f"{role} {stage.name}")
        if not tower_unchanged(model, tower):  # pragma: no cover - a recipe bug
            raise RuntimeError(f"{role} {stage.name}: the frozen vision tower changed")
        stages.append({"stage": stage.name, "seconds": round(time.time() - t0, 1),
                       "final_loss": round(sum(losses[-50:]) / min(50, len(losses)), 4)})
    manifest = expected_manifest(role, tokenizer, tower_dir, seed, role_recipe)
    manifest.update(parameters=sum(p.numel() for p in model.parameters()),
                    build_seconds=round(time.time() - start, 1), stages=stages)
    _save(out, [model, processor], manifest)
    log.info("built %s (%d parameters) in %.0fs -> %s", role, manifest["parameters"],
             manifest["build_seconds"], out)
    return manifest


def build_toy(out_dir: str | Path, force: bool = False, seed: int = 0,
              roles: tuple[str, ...] = ("teacher", "student"),
              recipes: dict[str, recipe.Recipe] | None = None,
              vision_recipe: vision.VisionRecipe | None = None) -> dict[str, dict]:
    """Build (or reuse, when already built with the same settings) the vision tower and
    the toy checkpoints. ``recipes`` / ``vision_recipe`` replace the shipped ones (tests
    build with a few steps)."""
    out_dir = Path(out_dir)
    recipes = recipes or {}
    tokenizer = models.build_tokenizer(seed)
    result = {}
    tower_dir = out_dir / VISION
    if force or not _matches(tower_dir, expected_vision_manifest(seed, vision_recipe)):
        result[VISION] = build_vision(tower_dir, seed, vision_recipe)
    else:
        log.info("the vision tower is already built at %s (use --force to rebuild)", tower_dir)
        result[VISION] = json.loads((tower_dir / MANIFEST).read_text())
    for role in roles:
        folder = out_dir / role
        want = expected_manifest(role, tokenizer, tower_dir, seed, recipes.get(role))
        if not force and _matches(folder, want):
            log.info("%s is already built at %s (use --force to rebuild)", role, folder)
            result[role] = json.loads((folder / MANIFEST).read_text())
            continue
        result[role] = build_role(role, folder, tokenizer, tower_dir, seed, recipes.get(role))
    return result
