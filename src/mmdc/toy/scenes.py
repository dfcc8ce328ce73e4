"""The synthetic world's scenes: a 4x4 grid of 8x8 cells, each empty or holding one
coloured shape (or one half of a bar magnet), drawn with Pillow into a 32x32 image and
described in words. :mod:`mmdc.toy.world` asks questions about them.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

GRID = 4
CELL = 8
IMAGE_SIZE = GRID * CELL

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("square", "circle", "triangle")
POLE_COLORS = {"N": (200, 30, 30), "S": (30, 60, 200)}



def random_object_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 6) -> dict:
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(GRID * GRID), n)
    objects = [
        {"row": c // GRID, "col": c % GRID, "shape": rng.choice(SHAPES),
         "color": rng.choice(list(COLORS))}
        for c in sorted(cells)
    ]
    return {"kind": "objects", "objects": objects}


def random_magnet_scene(rng: random.Random) -> dict:
    # Two bar magnets side by side in one row: cells 0-1 and 2-3.
    first = rng.choice(["NS", "SN"])
    second = rng.choice(["NS", "SN"])
    return {"kind": "magnets", "row": rng.randrange(GRID), "poles": list(first + second)}


def random_scene(rng: random.Random, magnet_rate: float = 0.15) -> dict:
    if rng.random() < magnet_rate:
        return random_magnet_scene(rng)
    return random_object_scene(rng, 1, 5)


def draw_scene(scene: dict) -> Image.Image:
    """Render a scene description to a 32x32 RGB image."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if scene["kind"] == "magnets":
        y = scene["row"] * CELL
        for col, pole in enumerate(scene["poles"]):
            x = col * CELL
            d.rectangle([x, y + 1, x + CELL - 1, y + CELL - 2], fill=POLE_COLORS[pole])
        # a dark gap between the two magnets
        d.line([2 * CELL - 1, y, 2 * CELL - 1, y + CELL - 1], fill=(0, 0, 0))
        return img
    for obj in scene["objects"]:
        x, y = obj["col"] * CELL, obj["row"] * CELL
        fill = COLORS[obj["color"]]
        if obj["shape"] == "square":
            d.rectangle([x + 1, y + 1, x + 6, y + 6], fill=fill)
        elif obj["shape"] == "circle":
            d.ellipse([x + 0, y + 0, x + 7, y + 7], fill=fill)
        else:
            d.polygon([(x + 3.5, y + 0), (x + 7, y + 7), (x + 0, y + 7)], fill=fill)
    return img


def describe_scene(scene: dict) -> str:
    """A caption listing what is drawn where (rows and columns counted from 1).

    The toy pre-training recipe uses it as a dense grounding task, the way LLaVA's first
    stage trains on captions."""
    if scene["kind"] == "magnets":
        poles = " ".join({"N": "north", "S": "south"}[p] for p in scene["poles"])
        return f"Two magnets in row {scene['row'] + 1}, poles from left to right: {poles}."
    parts = [f"a {o['color']} {o['shape']} at row {o['row'] + 1} column {o['col'] + 1}"
             for o in scene["objects"]]
    return "The picture shows " + ", ".join(parts) + "."
