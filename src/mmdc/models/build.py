"""Build the toy teacher and student checkpoints of the built-in default.

``build_toy(out_dir)`` trains the tokenizer on the synthetic task's text, builds both
tiny LLaVAs, runs the toy pre-training recipe on each and saves them with
``save_pretrained`` (model and processor) plus a ``mmdc_toy.json`` manifest recording the
spec, the recipe, the tokenizer's fingerprint and the build time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from mmdc.data import synthetic
from mmdc.data.pool import write_json
from mmdc.models import pretrain, toy

log = logging.getLogger(__name__)

MANIFEST = "mmdc_toy.json"
PRETRAIN_SIZE = 30000  # draws from the synthetic task's pretrain generator
ROLES = {
    "teacher": (toy.TEACHER_SPEC, pretrain.TEACHER_RECIPE),
    "student": (toy.STUDENT_SPEC, pretrain.STUDENT_RECIPE),
}


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def expected_manifest(role: str, tokenizer, seed: int = 0) -> dict:
    spec, recipe = ROLES[role]
    return {"role": role, "seed": seed, "spec": asdict(spec), "recipe": asdict(recipe),
            "pretrain_size": PRETRAIN_SIZE, "tokenizer": tokenizer_fingerprint(tokenizer)}


def is_built(folder: Path, role: str, tokenizer, seed: int = 0) -> bool:
    path = folder / MANIFEST
    if not path.is_file():
        return False
    have = json.loads(path.read_text())
    want = expected_manifest(role, tokenizer, seed)
    return all(have.get(k) == v for k, v in want.items())


def build_role(role: str, out: Path, tokenizer, seed: int = 0, pretrain_size: int = PRETRAIN_SIZE
               ) -> dict:
    spec, recipe = ROLES[role]
    start = time.time()
    processor = toy.build_processor(tokenizer, spec)
    model = toy.build_model(spec, tokenizer, seed=seed)
    instances = [i for i, _ in synthetic.generate_split("pretrain", pretrain_size, seed)]
    examples = pretrain.build_examples(instances, recipe, seed)
    data = pretrain.tokenize_examples(processor, examples)
    losses = pretrain.train(model, processor, data, recipe, seed=seed, desc=f"pretrain {role}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    manifest = expected_manifest(role, tokenizer, seed)
    manifest.update(parameters=sum(p.numel() for p in model.parameters()),
                    build_seconds=round(time.time() - start, 1),
                    final_loss=round(sum(losses[-50:]) / min(50, len(losses)), 4))
    write_json(tmp / MANIFEST, manifest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("built %s (%d parameters) in %.0fs -> %s", role, manifest["parameters"],
             manifest["build_seconds"], out)
    return manifest


def build_toy(out_dir: str | Path, force: bool = False, seed: int = 0,
              roles: tuple[str, ...] = ("teacher", "student")) -> dict[str, dict]:
    """Build (or reuse, when already built with the same settings) the toy checkpoints."""
    out_dir = Path(out_dir)
    tokenizer = toy.build_tokenizer(seed)
    result = {}
    for role in roles:
        folder = out_dir / role
        if not force and is_built(folder, role, tokenizer, seed):
            log.info("%s is already built at %s (use --force to rebuild)", role, folder)
            result[role] = json.loads((folder / MANIFEST).read_text())
            continue
        result[role] = build_role(role, folder, tokenizer, seed)
    return result
