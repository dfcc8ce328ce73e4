"""The built-in synthetic task: a procedurally drawn multimodal multiple-choice task.

Every image is drawn with Pillow from a *scene description* (a small dict), and every
answer is computed from that description, so ground truth is exact. The task follows the
ScienceQA schema (subjects, grades, hints, lectures, solutions) so that every official
ScienceQA column (NAT SOC LAN TXT IMG NO G1-6 G7-12) has items.

Images are 32x32 pixels: a 4x4 grid of 8x8 cells, each cell empty or holding one shape
(or one half of a bar magnet). With a vision patch size of 8 each patch is one cell.

Skills, in order of difficulty:

==============  ================  =====  =========================================
skill           subject           grade  what it asks
==============  ================  =====  =========================================
color           natural science   1      colour of the one shape of a given kind
shape           natural science   2      shape of the one object of a given colour
count           natural science   3      how many shapes
alphabet        language science  4      which word comes first (text-only)
count_color     natural science   6      how many shapes of a given colour
spatial         social science    7      which part of the map a shape is in
compare         natural science   8      more shapes of one colour or another
magnets         natural science   9      do two drawn magnets attract or repel
==============  ================  =====  =========================================

Splits (see :func:`build_task`): ``pretrain`` (broad and balanced: what a hub teacher
already knows), ``train`` (the small seed instruction set, hard skills rare), ``pool``
(unlabelled images with hidden scenes), ``val`` (the probe split) and ``test``
(balanced, held out).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from PIL import Image

from mmdc.data.record import Instance
from mmdc.toy.scenes import (  # noqa: F401 - the scenes are part of the world's API
    CELL,
    COLORS,
    GRID,
    IMAGE_SIZE,
    POLE_COLORS,
    SHAPES,
    describe_scene,
    draw_scene,
    random_magnet_scene,
    random_object_scene,
    random_scene,
)

WORDS = (
    "apple bird cat dog egg fish goat hat ink jam kite lamp moon nest owl pig queen "
    "rain sun tree umbrella van wolf yarn zoo"
).split()
REGIONS = ("north-west", "north-east", "south-west", "south-east")


@dataclass(frozen=True)
class Skill:
    name: str
    subject: str
    grade: int
    topic: str
    category: str
    lecture: str
    hard: bool
    needs_image: bool = True
    hint: str = ""  # a ScienceQA-style hint, attached to some instances
    hint_rate: float = 0.0


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill("color", "natural science", 1, "colors", "Identify colors",
              "Look at the shape and name its color.", hard=False,
              hint="Each shape has one color.", hint_rate=0.2),
        Skill("shape", "natural science", 2, "shapes", "Identify shapes",
              "Squares have four corners, triangles have three and circles have none.",
              hard=False),
        Skill("count", "natural science", 3, "counting", "Count objects",
              "To count shapes, look at each shape once.", hard=False),
        Skill("alphabet", "language science", 4, "reference-skills", "Alphabetical order",
              "Words in alphabetical order are sorted by their first letter.", hard=False,
              needs_image=False, hint="Compare the first letter of each word.", hint_rate=0.5),
        Skill("count_color", "natural science", 6, "counting", "Count objects by color",
              "To count shapes of one color, skip the shapes of other colors.", hard=True),
        Skill("spatial", "social science", 7, "geography", "Read a map",
              "On a map, north is up, south is down, east is right and west is left. "
              "Find the shape, then check which half of the map it is in, top or bottom, "
              "and left or right.",
              hard=True, hint="The top of the picture is north.", hint_rate=0.5),
        Skill("compare", "natural science", 8, "counting", "Compare amounts",
              "To compare two amounts, count each and pick the larger.", hard=True),
        Skill("magnets", "natural science", 9, "magnets", "Predict magnet forces",
              "Magnets push or pull without touching. Opposite poles attract and like "
              "poles repel.", hard=True,
              hint="The north pole is red and the south pole is blue.", hint_rate=0.5),
    ]
}
SKILL_NAMES = tuple(SKILLS)
HARD_SKILLS = tuple(n for n, s in SKILLS.items() if s.hard)
EASY_SKILLS = tuple(n for n, s in SKILLS.items() if not s.hard)

CAPTION_PROMPT = "Describe the picture."


def vqa_prompt(inst: Instance) -> str:
    """The short-answer form of a question (as in LLaVA-1.5's VQA data): the question
    alone, with the words to choose from when the question does not name them."""
    if inst.skill == "alphabet":
        return f"{inst.question} {', '.join(inst.choices)}"
    return inst.question


def vqa_answer(inst: Instance) -> str:
    """The short answer: the right option's text ("red", "3", "attract")."""
    return inst.choices[inst.answer]

# ------------------------------------------------------------------------ questions
# Each builder takes a scene (or None for text-only skills) and an rng and returns
# (question, choices, answer_index, solution), or None when the scene does not support
# the skill.

QA = tuple[str, list[str], int, str]


def _options(correct: str, options: list[str] | tuple[str, ...]) -> tuple[list[str], int]:
    """Closed-set skills list every option in a fixed order (as ScienceQA does for
    "attract / repel"), so the answer letter is a property of the value, and the skill's
    difficulty lies in perceiving and reasoning, not in locating the value among options."""
    options = list(options)
    return options, options.index(correct)


def scene_objects(scene: dict) -> list[dict]:
    return scene["objects"] if scene and scene["kind"] == "objects" else []


def _q_color(scene, rng) -> QA | None:
    objs = scene_objects(scene)
    unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    choices, ans = _options(o["color"], list(COLORS))
    return (f"What color is the {o['shape']}?", choices, ans,
            f"The {o['shape']} is {o['color']}.")


def _q_shape(scene, rng) -> QA | None:
    objs = scene_objects(scene)
    unique = [o for o in objs if sum(p["color"] == o["color"] for p in objs) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    choices, ans = _options(o["shape"], SHAPES)
    return (f"What shape is the {o['color']} object?", choices, ans,
            f"The {o['color']} object is a {o['shape']}.")


def _numbers(n: int, lo: int, hi: int) -> tuple[list[str], int]:
    return _options(str(n), [str(i) for i in range(lo, hi + 1)])


def _q_count(scene, rng) -> QA | None:
    objs = scene_objects(scene)
    if not 1 <= len(objs) <= 5:  # the options are 1-5
        return None
    n = len(objs)
    choices, ans = _numbers(n, 1, 5)
    noun = "shape" if n == 1 else "shapes"
    verb = "is" if n == 1 else "are"
    return ("How many shapes are in the picture?", choices, ans, f"There {verb} {n} {noun}.")


def _q_count_color(scene, rng) -> QA | None:
    objs = scene_objects(scene)
    if not objs:
        return None
    present = sorted({o["color"] for o in objs})
    color = rng.choice(present) if rng.random() < 0.85 else rng.choice(list(COLORS))
    n = sum(o["color"] == color for o in objs)
    if n > 5:  # the options are 0-5
        return None
    choices, ans = _numbers(n, 0, 5)
    return (f"How many {color} shapes are in the picture?", choices, ans,
            f"There are {n} {color} shapes.")


def map_region(o: dict) -> str:
    """The quarter of the map a shape is in: the top half is north, the left half west."""
    half = GRID // 2
    return REGIONS[(2 if o["row"] >= half else 0) + (1 if o["col"] >= half else 0)]


def _q_spatial(scene, rng) -> QA | None:
    objs = scene_objects(scene)
    unique = [o for o in objs if sum(p["color"] == o["color"] for p in objs) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    region = map_region(o)
    choices, ans = _options(region, REGIONS)
    return (f"In which part of the map is the {o['color']} shape?", choices, ans,
            f"The {o['color']} shape is in row {o['row'] + 1} and column {o['col'] + 1}, "
            f"so it is in the {region} part.")


def _q_compare(scene, rng) -> QA | None:
    objs = scene_objects(scene)
    counts = {c: sum(o["color"] == c for o in objs) for c in COLORS}
    pairs = [(a, b) for a in COLORS for b in COLORS if a < b and counts[a] != counts[b]
             and counts[a] + counts[b] >= 2]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    more = a if counts[a] > counts[b] else b
    choices = [a, b]
    return (f"Are there more {a} shapes or {b} shapes?", choices, choices.index(more),
            f"There are {counts[a]} {a} shapes and {counts[b]} {b} shapes.")


def _q_magnets(scene, rng) -> QA | None:
    if not scene or scene["kind"] != "magnets":
        return None
    p1, p2 = scene["poles"][1], scene["poles"][2]
    attract = p1 != p2
    choices = ["attract", "repel"]
    name = {"N": "north", "S": "south"}
    rule = "Opposite poles attract." if attract else "Like poles repel."
    return ("Will these magnets attract or repel each other?", choices,
            choices.index("attract" if attract else "repel"),
            f"The facing poles are {name[p1]} and {name[p2]}. {rule}")


def _q_alphabet(scene, rng) -> QA | None:
    words = rng.sample(WORDS, rng.choice([2, 3]))
    first = min(words)
    return ("Which word would come first in alphabetical order?", words, words.index(first),
            f"The word {first} comes first in alphabetical order.")


QUESTION_BUILDERS: dict[str, Callable[[dict | None, random.Random], QA | None]] = {
    "color": _q_color,
    "shape": _q_shape,
    "count": _q_count,
    "alphabet": _q_alphabet,
    "count_color": _q_count_color,
    "spatial": _q_spatial,
    "compare": _q_compare,
    "magnets": _q_magnets,
}


def scene_for_skill(skill: str, rng: random.Random) -> dict | None:
    """A random scene on which ``skill`` can be asked (None for text-only skills)."""
    if not SKILLS[skill].needs_image:
        return None
    if skill == "magnets":
        return random_magnet_scene(rng)
    lo, hi = {"color": (1, 5), "shape": (1, 5), "count": (1, 5), "count_color": (1, 5),
              "spatial": (2, 6), "compare": (2, 6)}[skill]
    return random_object_scene(rng, lo, hi)


def make_instance(skill: str, rng: random.Random, iid: str, split: str,
                  scene: dict | None = None, max_tries: int = 200) -> Instance:
    """Draw a scene that supports ``skill`` (unless one is given) and ask it."""
    build = QUESTION_BUILDERS[skill]
    for _ in range(max_tries):
        sc = scene if scene is not None else scene_for_skill(skill, rng)
        qa = build(sc, rng)
        if qa is not None:
            break
    else:
        if scene is not None:
            raise ValueError(f"scene does not support skill {skill!r}")
        raise RuntimeError(f"could not draw a scene for skill {skill!r}")  # pragma: no cover
    s = SKILLS[skill]
    question, choices, answer, solution = qa
    context = s.hint if s.hint and rng.random() < s.hint_rate else ""
    return Instance(
        id=iid, question=question, choices=choices, answer=answer,
        # where the official-layout writer puts the image (relative to the dataset root)
        image=f"images/{split}/{iid}/image.png" if sc is not None else None,
        context=context, lecture=s.lecture, solution=solution,
        subject=s.subject, grade=s.grade, topic=s.topic, category=s.category,
        skill=skill, split=split, source="synthetic",
        meta={"scene": sc} if sc is not None else {},
    )


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class TaskSizes:
    pretrain: int = 2000
    train: int = 400
    pool: int = 600
    val: int = 200
    test: int = 400


# The seed instruction set is skewed: hard skills are rare (the user's labelled data).
SEED_WEIGHTS = {n: (1.0 if not s.hard else 0.2) for n, s in SKILLS.items()}


def _skill_cycle(n: int, weights: dict[str, float], rng: random.Random) -> list[str]:
    total = sum(weights.values())
    counts = {k: int(round(n * w / total)) for k, w in weights.items()}
    skills = [k for k, c in counts.items() for _ in range(c)]
    while len(skills) < n:
        skills.append(rng.choice([k for k, w in weights.items() if w > 0]))
    skills = skills[:n]
    rng.shuffle(skills)
    return skills


def generate_split(split: str, n: int, seed: int) -> Iterator[tuple[Instance, Image.Image | None]]:
    """Yield ``n`` (instance, image) pairs of a labelled split, deterministically."""
    rng = random.Random(f"mmdc-synthetic-{seed}-{split}")
    weights = SEED_WEIGHTS if split == "train" else {k: 1.0 for k in SKILLS}
    for i, skill in enumerate(_skill_cycle(n, weights, rng)):
        inst = make_instance(skill, rng, f"{split}-{i:05d}", split)
        scene = inst.meta.get("scene")
        yield inst, (draw_scene(scene) if scene is not None else None)


def sample_instances(n: int, weights: dict[str, float], tag: str, seed: int = 0,
                     split: str = "pretrain") -> list[Instance]:
    """``n`` labelled instances with skills in proportion to ``weights`` (deterministic
    for a given ``tag`` and ``seed``); the scene rides in ``meta``, no image is drawn."""
    rng = random.Random(f"mmdc-synthetic-{seed}-{tag}")
    return [make_instance(skill, rng, f"{tag}-{i:06d}", split)
            for i, skill in enumerate(_skill_cycle(n, weights, rng))]


def write_instance(seed: Instance, mode: str, scene: dict | None, rng: random.Random,
                   iid: str = "written") -> Instance:
    """The instance a teacher that knows this world writes when asked for a new question
    like ``seed`` ("same" kind, or a "rarer", harder one of the same subject) about an
    image of ``scene``: the asked-for kind when the image can carry it well-posed,
    otherwise the nearest kind it can (same subject first): a magnet picture only
    carries magnet questions, a question about "the circle" needs exactly one circle."""
    if scene is None or seed.skill not in SKILLS or not SKILLS[seed.skill].needs_image:
        return make_instance(seed.skill if seed.skill in SKILLS else "alphabet", rng, iid,
                             "written")
    subject = SKILLS[seed.skill].subject
    image_skills = [k for k, s in SKILLS.items() if s.needs_image]
    if mode == "same":
        wanted = [seed.skill]
    else:
        harder = [k for k in HARD_SKILLS if SKILLS[k].subject == subject]
        wanted = [rng.choice(harder)] if harder else []
    same_subject = [k for k in image_skills if SKILLS[k].subject == subject and k not in wanted]
    rng.shuffle(same_subject)
    rest = [k for k in image_skills if k not in wanted and k not in same_subject]
    rng.shuffle(rest)
    for skill in wanted + same_subject + rest:
        if QUESTION_BUILDERS[skill](scene, random.Random(rng.random())) is not None:
            return make_instance(skill, rng, iid, "written", scene=scene)
    raise ValueError("the scene supports no question")  # pragma: no cover - count always fits


# The pool's layout: its images are drawn as the seed split's are (bumped when that changes,
# so that a task folder written before is not read as this one).
POOL_VERSION = 2


def generate_pool(n: int, seed: int) -> Iterator[tuple[str, dict, Image.Image]]:
    """Yield ``n`` unlabelled (id, hidden scene, image) triples, drawn as the seed split's
    images are: the user's unlabelled images come from the same source as the labelled
    ones, so the skills rare in one are rare in the other (a magnet picture in 19). A pool
    richer in them (version 1 drew magnets in 15% of its pictures, three times the seed
    split's share) gave blind random generation the pictures the seed split lacks."""
    rng = random.Random(f"mmdc-synthetic-{seed}-pool")
    weights = {k: w for k, w in SEED_WEIGHTS.items() if SKILLS[k].needs_image}
    for i, skill in enumerate(_skill_cycle(n, weights, rng)):
        scene = scene_for_skill(skill, rng)
        yield f"pool-{i:05d}", scene, draw_scene(scene)
