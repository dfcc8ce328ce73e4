"""The toy vision tower: a CLIP vision encoder pretrained on the built-in world's scenes.

It plays the part CLIP ViT-L/336 plays for LLaVA: a vision encoder pretrained on its own,
saved as a plain ``CLIPVisionModel`` folder, that teacher and student are both assembled
on and keep frozen. CLIP learns from image-caption pairs; the toy tower learns from the
hidden scene description instead, with a direct per-patch objective (each 8x8 patch is one
cell of the 4x4 grid), which is cheap and exact:

* what is in the cell: empty, one of 4 colours x 3 shapes, or a north / south magnet pole,
  as one class and as its colour, shape and pole apart (so that each is a direction of
  its own in the features: a question about "the circle" must find the circle);
* where the cell is: its row and column;
* scene context, as CLIP's patch features carry context from the whole image: how many
  shapes share the cell's colour, how many share its shape, how many shapes there are, and
  what its left and right neighbours hold.

The objective's heads are linear probes on the features LLaVA's projector reads (the
encoder's last hidden state, patch tokens): what they can read, the language model can.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mmdc.toy import world

log = logging.getLogger(__name__)

CELLS = world.GRID * world.GRID
# cell content classes: 0 empty, 1..12 colour x shape, 13 north pole, 14 south pole
N_CONTENT = 1 + len(world.COLORS) * len(world.SHAPES) + 2
EDGE = N_CONTENT  # a neighbour beyond the grid's edge
MAX_COUNT = CELLS
IGNORE = -100

# name -> number of classes of each per-patch target
TARGETS: dict[str, int] = {
    "content": N_CONTENT, "color": 1 + len(world.COLORS), "shape": 1 + len(world.SHAPES),
    "pole": 3, "row": world.GRID, "col": world.GRID,
    "same_color": MAX_COUNT + 1, "same_shape": MAX_COUNT + 1, "total": MAX_COUNT + 1,
    "left": N_CONTENT + 1, "right": N_CONTENT + 1,
}


@dataclass(frozen=True)
class VisionRecipe:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    magnet_rate: float = 0.15
    max_objects: int = 8


VISION_RECIPE = VisionRecipe()


def content_class(obj: dict) -> int:
    return 1 + list(world.COLORS).index(obj["color"]) * len(world.SHAPES) + \
        world.SHAPES.index(obj["shape"])


def cell_targets(scene: dict) -> dict[str, list[int]]:
    """The per-patch targets of one scene: name -> 16 labels in raster order
    (``IGNORE`` where a target does not apply, e.g. colour counts of an empty cell)."""
    content = [0] * CELLS
    color = [0] * CELLS
    shape = [0] * CELLS
    pole = [0] * CELLS
    same_color = [IGNORE] * CELLS
    same_shape = [IGNORE] * CELLS
    objects = world.scene_objects(scene)
    if scene["kind"] == "magnets":
        for col, p in enumerate(scene["poles"]):
            content[scene["row"] * world.GRID + col] = N_CONTENT - 2 + (p == "S")
            pole[scene["row"] * world.GRID + col] = 1 + (p == "S")
    for o in objects:
        i = o["row"] * world.GRID + o["col"]
        content[i] = content_class(o)
        color[i] = 1 + list(world.COLORS).index(o["color"])
        shape[i] = 1 + world.SHAPES.index(o["shape"])
        same_color[i] = sum(p["color"] == o["color"] for p in objects)
        same_shape[i] = sum(p["shape"] == o["shape"] for p in objects)
    g = world.GRID
    return {
        "content": content, "color": color, "shape": shape, "pole": pole,
        "row": [i // g for i in range(CELLS)],
        "col": [i % g for i in range(CELLS)],
        "same_color": same_color, "same_shape": same_shape,
        "total": [len(objects)] * CELLS,
        "left": [content[i - 1] if i % g else EDGE for i in range(CELLS)],
        "right": [content[i + 1] if i % g != g - 1 else EDGE for i in range(CELLS)],
    }


def training_scene(rng: random.Random, recipe: VisionRecipe = VISION_RECIPE) -> dict:
    if rng.random() < recipe.magnet_rate:
        return world.random_magnet_scene(rng)
    return world.random_object_scene(rng, 1, recipe.max_objects)


class SceneObjective(nn.Module):
    """Linear heads on the tower's patch features, one per target."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in TARGETS.items()})

    def forward(self, features: torch.Tensor, labels: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
        """(summed cross-entropy, name -> (correct, counted)) over patch features
        ``(batch, 16, hidden)`` and labels ``(batch, 16)``."""
        loss = features.new_zeros(())
        hits = {}
        for name, head in self.heads.items():
            logits = head(features).flatten(0, 1)
            y = labels[name].flatten()
            loss = loss + nn.functional.cross_entropy(logits, y, ignore_index=IGNORE)
            m = y != IGNORE
            hits[name] = (int((logits.argmax(-1)[m] == y[m]).sum()), int(m.sum()))
        return loss, hits


def patch_features(tower, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The patch tokens of the hidden state LLaVA's projector reads
    (``vision_feature_layer``; strategy ``default`` drops the class token)."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def batch_labels(scenes: list[dict]) -> dict[str, torch.Tensor]:
    per = [cell_targets(s) for s in scenes]
    return {k: torch.tensor([p[k] for p in per]) for k in TARGETS}


def pixels(image_processor, scenes: list[dict]) -> torch.Tensor:
    images = [world.draw_scene(s) for s in scenes]
    return image_processor(images, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def evaluate_tower(tower, objective: SceneObjective, image_processor, n: int = 1024,
                   seed: int = 1, recipe: VisionRecipe = VISION_RECIPE) -> dict[str, float]:
    """Held-out per-target accuracy (%) on ``n`` fresh scenes."""
    rng = random.Random(f"mmdc-vision-heldout-{seed}")
    scenes = [training_scene(rng, recipe) for _ in range(n)]
    totals = {k: [0, 0] for k in TARGETS}
    was = tower.training
    tower.eval()
    for s in range(0, n, 256):
        chunk = scenes[s:s + 256]
        feats = patch_features(tower, pixels(image_processor, chunk))
        _, hits = objective(feats, batch_labels(chunk))
        for k, (c, m) in hits.items():
            totals[k][0] += c
            totals[k][1] += m
    tower.train(was)
    return {k: round(100 * c / max(m, 1), 2) for k, (c, m) in totals.items()}


def pretrain_tower(tower, image_processor, recipe: VisionRecipe = VISION_RECIPE, seed: int = 0,
                   desc: str = "pretrain vision") -> dict:
    """Train ``tower`` (a ``CLIPVisionModel``) on the scene objective; returns the steps,
    seconds, final loss and held-out accuracy per target. The heads are discarded."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    rng = random.Random(f"mmdc-vision-{seed}")
    objective = SceneObjective(tower.config.hidden_size)
    params = list(tower.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, recipe.warmup, recipe.steps)
    tower.train()
    start = time.time()
    losses = []
    for _ in tqdm(range(recipe.steps), desc=desc, leave=False):
        scenes = [training_scene(rng, recipe) for _ in range(recipe.batch_size)]
        loss, _ = objective(patch_features(tower, pixels(image_processor, scenes)),
                            batch_labels(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    tower.eval()
    seconds = time.time() - start
    heldout = evaluate_tower(tower, objective, image_processor, seed=seed + 1, recipe=recipe)
    log.info("vision tower: %d steps in %.0fs, held-out accuracy %s", recipe.steps, seconds,
             heldout)
    return {"recipe": asdict(recipe), "steps": recipe.steps, "seconds": round(seconds, 1),
            "final_loss": round(sum(losses[-20:]) / min(20, len(losses)), 4),
            "heldout_acc": heldout}
