"""Ground-truth diagnostics of the built-in task: the solver and the report tables."""

import json
import random

import pytest

from mmdc.data.pool import write_json, write_jsonl
from mmdc.toy import truth, world
from mmdc.toy.diagnostics import check_record, format_diagnostics, iteration_diagnostics

SCENE = {"kind": "objects", "objects": [
    {"row": 0, "col": 0, "shape": "square", "color": "red"},
    {"row": 2, "col": 0, "shape": "circle", "color": "blue"},
    {"row": 2, "col": 3, "shape": "circle", "color": "blue"},
]}
MAGNETS = {"kind": "magnets", "row": 1, "poles": ["N", "S", "S", "N"]}


@pytest.mark.parametrize("skill", world.SKILL_NAMES)
def test_solver_agrees_with_every_generated_instance(skill):
    rng = random.Random(skill)
    for n in range(200):
        inst = world.make_instance(skill, rng, f"x{n}", "test")
        sol = truth.solve(inst.question, inst.choices, inst.meta.get("scene"))
        assert (sol.skill, sol.answer) == (skill, inst.answer)


@pytest.mark.parametrize("question, choices, scene, expected", [
    ("What color is the square?", ["red", "green", "blue", "yellow"], SCENE, ("color", 0)),
    # two circles: "the circle" names no single object
    ("What color is the circle?", ["red", "green", "blue", "yellow"], SCENE, ("color", None)),
    ("What shape is the red object?", ["square", "circle", "triangle"], SCENE, ("shape", 0)),
    ("How many blue shapes are in the picture?", ["0", "1", "2"], SCENE, ("count_color", 2)),
    ("How many shapes are in the picture?", ["1", "2"], SCENE, ("count", None)),  # 3 not offered
    ("In which part of the map is the red shape?", list(world.REGIONS), SCENE,
     ("spatial", 0)),
    # no green shape in the scene
    ("In which part of the map is the green shape?", list(world.REGIONS), SCENE,
     ("spatial", None)),
    # two blue shapes: "the blue shape" names no single object
    ("In which part of the map is the blue shape?", list(world.REGIONS), SCENE,
     ("spatial", None)),
    ("Are there more blue shapes or red shapes?", ["blue", "red"], SCENE, ("compare", 0)),
    ("Will these magnets attract or repel each other?", ["attract", "repel"], MAGNETS,
     ("magnets", 1)),
    ("Will these magnets attract or repel each other?", ["attract", "repel"], SCENE,
     ("magnets", None)),
    ("Which word would come first in alphabetical order?", ["kite", "cat"], None,
     ("alphabet", 1)),
    ("Is the sky blue?", ["yes", "no"], SCENE, (None, None)),
])
def test_solver_cases(question, choices, scene, expected):
    sol = truth.solve(question, choices, scene)
    assert (sol.skill, sol.answer) == expected


def test_check_record_outcomes():
    scenes = {"img/a.png": SCENE}
    base = {"image": "img/a.png", "question": "What shape is the red object?",
            "choices": ["square", "circle", "triangle"]}
    assert check_record({**base, "answer": 0}, scenes) == ("shape", "correct")
    assert check_record({**base, "answer": 2}, scenes) == ("shape", "wrong")
    # the label the teacher first wrote, before self-consistency relabelled it
    rec = {**base, "answer": 0, "meta": {"written_answer": 1}}
    assert check_record(rec, scenes, "written_answer") == ("shape", "wrong")
    assert check_record({**base, "question": "Why?", "answer": 0}, scenes)[1] == "off_template"


def test_iteration_diagnostics_and_tables(tmp_path):
    it = tmp_path / "iter_1"
    it.mkdir()
    scenes = {"img/a.png": SCENE, "img/m.png": MAGNETS}
    good = {"id": "g1", "image": "img/a.png", "question": "What color is the square?",
            "choices": ["red", "green", "blue", "yellow"], "answer": 0,
            "meta": {"written_answer": 2}}
    bad = {"id": "g2", "image": "img/m.png",
           "question": "Will these magnets attract or repel each other?",
           "choices": ["attract", "repel"], "answer": 0, "meta": {"written_answer": 0}}
    write_jsonl(it / "generated_accepted.jsonl", [good, bad])
    write_jsonl(it / "generated_rejected.jsonl", [
        {"id": "g3", "reason": "malformed", "text": "nonsense"},
        {"id": "g4", "reason": "unverified", "record": {**good, "answer": 3}},
    ])
    write_json(it / "generation_report.json", {
        "asked": 4, "accepted": 2,
        "dropped": {"malformed": 1, "duplicate": 0, "unverified": 1, "not_challenging": 0,
                    "over_budget": 0}})
    d = iteration_diagnostics(it, scenes)
    q = d["label_quality"]
    assert q["accepted"] == {"n": 2, "correct": 1, "wrong": 1, "ill_posed": 0,
                             "off_template": 0, "label_acc": 50.0}
    assert q["accepted_as_written"]["correct"] == 0  # both first-written labels were wrong
    assert q["unverified"]["wrong"] == 1
    assert d["generated_skills"] == {"color": 1, "magnets": 1}
    assert d["acceptance"] == {"asked": 4, "accepted": 2, "parsed": 3, "malformed": 1,
                               "duplicate": 0,
                               "unverified": 1, "not_challenging": 0, "over_budget": 0}
    text = format_diagnostics({1: d})
    assert "| 1 | 4 | 3 (75%) |" in text  # the writing table: asked, parsed
    assert "| 1 | accepted | 2 | 50.0% | 1 | 1 | 0 | 0 |" in text
    assert "| 1 | 4 | 50% | 25% | 0% | 25% | 0% | 0% |" in text
    assert "| magnets | - | - | 1 |" in text
    json.dumps(d)  # the report stores it as JSON
