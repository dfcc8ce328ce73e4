import pytest

from mmdc.data.prompts import (
    build_prompt,
    build_target,
    build_write_prompt,
    format_written,
    parse_answer,
    parse_written,
)
from mmdc.data.record import Instance


def _inst(**kw):
    base = dict(id="1", question="How many?", choices=["1", "2", "3"], answer=1,
                lecture="Count.", solution="There are 2.")
    base.update(kw)
    return Instance(**base)


def test_cqm_a_prompt_layout():
    p = build_prompt(_inst(context=""), "CQM-A")
    assert p == ("Context: N/A\nQuestion: How many?\nOptions: (A) 1 (B) 2 (C) 3\n"
                 "Answer with the option's letter from the given choices directly.")
    assert build_prompt(_inst(context="A hint."), "CQM-A").startswith("Context: A hint.\n")


def test_lea_target_ends_with_answer():
    assert build_target(_inst(), "CQM-LEA") == "Count. There are 2. The answer is B."
    assert build_target(_inst(), "CQM-A") == "B"
    with pytest.raises(ValueError):
        build_prompt(_inst(), "QCM")


@pytest.mark.parametrize("text,expected", [
    ("B", 1), (" C ", 2), ("A. because", 0), ("The answer is C.", 2),
    ("Lecture. The answer is A.", 0), ("The answer is A. The answer is B.", None),
    ("D", None), ("b", None), ("I think B", None), ("", None), ("The answer is E.", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text, 3) == expected


def test_written_round_trip():
    inst = _inst()
    parsed = parse_written(format_written(inst))
    assert parsed == {"context": "", "question": "How many?", "choices": ["1", "2", "3"],
                      "answer": 1, "lecture": "Count.", "solution": "There are 2."}


def test_written_layout_carries_the_context_first():
    inst = _inst(context="The north pole is red.")
    text = format_written(inst)
    assert text.splitlines()[0] == "Context: The north pole is red."
    assert parse_written(text)["context"] == "The north pole is red."
    # a teacher that writes the prompts' placeholder means no context
    assert parse_written("Context: N/A\n" + format_written(_inst()))["context"] == ""


@pytest.mark.parametrize("text,reason", [
    ("Question: x\nOptions: (A) a (B) b", "answer"),
    ("Options: (A) a (B) b\nAnswer: A", "question"),
    ("Question: x\nOptions: a, b\nAnswer: A", "layout"),
    ("Question: x\nOptions: (A) a (B) a\nAnswer: A", "repeated"),
    ("Question: x\nOptions: (A) a (C) b\nAnswer: A", "order"),
    ("Question: x\nOptions: (A) a (B) b\nAnswer: C", "not one of"),
    ("Question: x\nQuestion: y\nOptions: (A) a (B) b\nAnswer: A", "duplicate"),
])
def test_parse_written_rejects(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_written(text)


def test_write_prompt_modes():
    img = _inst(image="a.png")
    assert "same kind about the image" in build_write_prompt(img, "same")
    assert "harder" in build_write_prompt(img, "rarer")
    assert "about the image" not in build_write_prompt(_inst(), "same")


def test_write_prompt_shows_the_seed_as_read_and_names_the_lines_to_write():
    # a teacher never trained on the task (a served LLaVA) sees the seed in the layout it
    # is asked for, and which lines to add; not the seed's answer, which it could copy
    seed = _inst(image="a.png", context="The north pole is red.")
    lines = build_write_prompt(seed, "same").splitlines()
    assert lines[:4] == ["Seed question:", "Context: The north pole is red.",
                         "Question: How many?", "Options: (A) 1 (B) 2 (C) 3"]
    for field in ("Answer:", "Lecture:", "Solution:"):
        assert field in lines[-1]
    assert "There are 2" not in "\n".join(lines) and "Count." not in "\n".join(lines)
    assert build_write_prompt(_inst(), "same").splitlines()[1] == "Context: N/A"
    # what a teacher writes back in that layout parses, the answer letter in any of the
    # usual spellings
    for answer in ("B", "B.", "(B)"):
        written = ("Context: N/A\nQuestion: How many?\nOptions: (A) 1 (B) 2 (C) 3\n"
                   f"Answer: {answer}\nLecture: Count.\nSolution: There are 2.")
        assert parse_written(written)["answer"] == 1
