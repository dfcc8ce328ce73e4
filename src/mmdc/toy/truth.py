"""The truth about a question written for the built-in task: the correct option of a
question that follows one of the task's templates, computed from the image's hidden scene.

The built-in task knows every image's scene, so a question *written by the teacher* can be
checked against it. This is for diagnostics (reports, benchmarks) only: the method never
sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmdc.toy.world import COLORS, SHAPES, map_region, scene_objects

_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_TEMPLATES: list[tuple[str, re.Pattern]] = [
    ("color", re.compile(rf"^What color is the ({_S})\?$")),
    ("shape", re.compile(rf"^What shape is the ({_C}) object\?$")),
    ("count", re.compile(r"^How many shapes are in the picture\?$")),
    ("count_color", re.compile(rf"^How many ({_C}) shapes are in the picture\?$")),
    ("spatial", re.compile(rf"^In which part of the map is the ({_C}) shape\?$")),
    ("compare", re.compile(rf"^Are there more ({_C}) shapes or ({_C}) shapes\?$")),
    ("magnets", re.compile(r"^Will these magnets attract or repel each other\?$")),
    ("alphabet", re.compile(r"^Which word would come first in alphabetical order\?$")),
]


@dataclass(frozen=True)
class Solution:
    skill: str | None  # None: the question follows none of the task's templates
    answer: int | None  # the correct option; None: ill-posed on this scene / these options


def _unique(objs: list[dict], key: str, value: str) -> dict | None:
    found = [o for o in objs if o[key] == value]
    return found[0] if len(found) == 1 else None


def _true_value(skill: str, groups: tuple[str, ...], scene: dict | None,
                choices: list[str]) -> str | None:
    if skill == "alphabet":
        return min(choices) if len(set(choices)) == len(choices) else None
    if scene is None:
        return None
    if skill == "magnets":
        if scene["kind"] != "magnets":
            return None
        return "attract" if scene["poles"][1] != scene["poles"][2] else "repel"
    objs = scene_objects(scene)
    if skill == "count":
        return str(len(objs)) if objs else None
    if skill == "count_color":
        return str(sum(o["color"] == groups[0] for o in objs)) if objs else None
    if skill == "color":
        o = _unique(objs, "shape", groups[0])
        return o["color"] if o else None
    if skill == "shape":
        o = _unique(objs, "color", groups[0])
        return o["shape"] if o else None
    if skill == "spatial":
        o = _unique(objs, "color", groups[0])
        return map_region(o) if o else None
    if skill == "compare":
        na = sum(o["color"] == groups[0] for o in objs)
        nb = sum(o["color"] == groups[1] for o in objs)
        return None if na == nb or groups[0] == groups[1] else (groups[0] if na > nb else groups[1])
    return None


def solve(question: str, choices: list[str], scene: dict | None) -> Solution:
    """The correct option of a question about ``scene``, when it follows a task template."""
    q = " ".join(question.split())
    for skill, pattern in _TEMPLATES:
        m = pattern.match(q)
        if m:
            value = _true_value(skill, m.groups(), scene, list(choices))
            answer = choices.index(value) if value is not None and value in choices else None
            return Solution(skill, answer)
    return Solution(None, None)
