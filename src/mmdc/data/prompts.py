"""Prompt formats and answer parsing.

* ``CQM-A``: context, question, options -> the answer letter (LLaVA's ScienceQA prompt).
* ``CQM-LEA``: context, question, options -> lecture, explanation (solution), answer,
  ending in "The answer is X." (the teacher's rationale format).
* ``WRITE``: a seed question (context, question, options) and an image -> a new instance
  in the :func:`format_written` layout, which :func:`parse_written` reads back (the
  teacher's generation format).

The answer parser follows LLaVA's ScienceQA evaluation: a bare letter; an "X. " prefix;
exactly one "The answer is X." match; anything else is wrong.
"""

from __future__ import annotations

import re

from mmdc.data.record import LETTERS, Instance

PROMPT_FORMATS = ("CQM-A", "CQM-LEA")

DIRECT_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LEA_INSTRUCTION = "Explain with a lecture and a solution, then give the answer."
WRITE_SAME = "Write a new question of the same kind about the image."
WRITE_RARER = "Write a new, harder question of the same subject about the image."
WRITE_SAME_TEXT = "Write a new question of the same kind."
WRITE_LAYOUT = ("Write it as the seed is written, then add three lines: Answer: the "
                "option's letter, Lecture: what one needs to know, Solution: how to answer.")


def format_options(choices: list[str]) -> str:
    return " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))


def build_prompt(inst: Instance, fmt: str = "CQM-A") -> str:
    """The user text of a multiple-choice question (the image is passed separately)."""
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; allowed: {', '.join(PROMPT_FORMATS)}")
    context = inst.context.strip() or "N/A"
    instruction = DIRECT_INSTRUCTION if fmt == "CQM-A" else LEA_INSTRUCTION
    return (f"Context: {context}\nQuestion: {inst.question}\n"
            f"Options: {format_options(inst.choices)}\n{instruction}")


def build_target(inst: Instance, fmt: str = "CQM-A") -> str:
    """The reference answer text of a labelled instance in the given format."""
    letter = inst.answer_letter
    if letter is None:
        raise ValueError(f"instance {inst.id!r} has no answer")
    if fmt == "CQM-A":
        return letter
    parts = [p for p in (inst.lecture.strip(), inst.solution.strip()) if p]
    rationale = " ".join(parts)
    return f"{rationale} The answer is {letter}." if rationale else f"The answer is {letter}."


_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")
_PREFIX = re.compile(r"^([A-Z])\.\s")


def parse_answer(text: str, n_choices: int) -> int | None:
    """Return the chosen option index, or None (counted as wrong)."""
    text = text.strip()
    allowed = LETTERS[:n_choices]
    if len(text) == 1 and text in allowed:
        return allowed.index(text)
    m = _PREFIX.match(text + " ")
    if m and m.group(1) in allowed:
        return allowed.index(m.group(1))
    found = _THE_ANSWER_IS.findall(text)
    if len(found) == 1 and found[0] in allowed:
        return allowed.index(found[0])
    return None


# ----------------------------------------------------------------- instance writing


def write_instruction(seed: Instance, mode: str = "same") -> str:
    """What the teacher is asked to write for ``seed``: a question of the same kind, or,
    ``mode="rarer"``, a harder one of the same subject; about the image unless the seed
    is text-only."""
    if mode not in ("same", "rarer"):
        raise ValueError(f"unknown write mode {mode!r}; allowed: same, rarer")
    if seed.image is None:
        return WRITE_SAME_TEXT
    return WRITE_SAME if mode == "same" else WRITE_RARER


def build_write_prompt(seed: Instance, mode: str = "same") -> str:
    """Ask the teacher for a new instance modelled on ``seed``.

    ``mode="same"``: same skill (a hard seed); ``mode="rarer"``: same subject but a
    harder, rarer kind (an easy seed). The seed is shown as the teacher reads a question
    (context, question and options, one line each), and the prompt names the lines to
    add, so that a teacher never trained on this task (a served LLaVA) writes the
    :func:`format_written` layout that :func:`parse_written` reads. The seed's answer is
    not shown: a teacher that copies it would give new instances their seeds' answers.
    Whether an image accompanies the prompt is up to the caller (text-only seeds get
    none)."""
    instruction = write_instruction(seed, mode)
    context = seed.context.strip() or "N/A"
    return (f"Seed question:\nContext: {context}\nQuestion: {seed.question}\n"
            f"Options: {format_options(seed.choices)}\n{instruction}\n{WRITE_LAYOUT}")


# The version of the writing task (prompt and written layout); the toy teacher's manifest
# records it, so a teacher trained on an older one is rebuilt (2: the context line; 3: the
# prompt shows the seed's context and options and names the lines to write).
WRITTEN_LAYOUT = 3


def format_written(inst: Instance) -> str:
    """The layout in which the teacher writes an instance: its context first when it has
    one (as the task's prompts put it: a hint such as which colour is the north pole),
    so that new instances can carry contexts like the questions the student is tested on."""
    context = inst.context.strip()
    lines = [f"Context: {context}"] if context else []
    lines += [f"Question: {inst.question}", f"Options: {format_options(inst.choices)}",
             f"Answer: {inst.answer_letter}"]
    if inst.lecture:
        lines.append(f"Lecture: {inst.lecture}")
    if inst.solution:
        lines.append(f"Solution: {inst.solution}")
    return "\n".join(lines)


_OPTION = re.compile(r"\(([A-Z])\)\s*")


def parse_written(text: str) -> dict:
    """Parse a teacher-written instance into record fields.

    Returns a dict with context, question, choices, answer, lecture, solution. Raises
    ``ValueError`` with a short reason on malformed output."""
    fields: dict[str, str] = {}
    for line in text.strip().splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key in ("context", "question", "options", "answer", "lecture", "solution"):
            if key in fields:
                raise ValueError(f"duplicate field {key!r}")
            fields[key] = value.strip()
    for key in ("question", "options", "answer"):
        if not fields.get(key):
            raise ValueError(f"missing field {key!r}")
    parts = _OPTION.split(fields["options"])
    # parts = ["", "A", "text ", "B", "text", ...]
    if parts[0].strip() or len(parts) < 5:
        raise ValueError("options are not in the '(A) ... (B) ...' layout")
    letters, choices = parts[1::2], [p.strip() for p in parts[2::2]]
    if letters != list(LETTERS[: len(letters)]):
        raise ValueError("option letters are not A, B, C, ... in order")
    if any(not c for c in choices) or len(set(choices)) != len(choices):
        raise ValueError("options are empty or repeated")
    answer = fields["answer"].strip().rstrip(".").strip("()")  # "B", "B." or "(B)"
    if answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of the option letters")
    context = fields.get("context", "")
    return {
        "context": "" if context == "N/A" else context, "question": fields["question"],
        "choices": choices, "answer": letters.index(answer),
        "lecture": fields.get("lecture", ""), "solution": fields.get("solution", ""),
    }
