"""The canonical instance record every reader produces and every stage consumes.

One record is one multiple-choice (or open-ended) instance in the ScienceQA schema:
question, choices, answer index, context (the ScienceQA "hint"), rationale (lecture and
solution) and metadata. Images are referenced by a path relative to the dataset root,
never embedded, so pools stay small JSONL files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

GRADE_RANGE = range(1, 13)


@dataclass
class Instance:
    id: str
    question: str
    choices: list[str]
    answer: int | None  # index into choices; None when unknown (unlabelled)
    image: str | None = None  # path relative to the dataset root, or None (text-only)
    context: str = ""  # ScienceQA "hint"; empty is normal
    lecture: str = ""
    solution: str = ""
    subject: str = ""  # "natural science" | "social science" | "language science"
    grade: int | None = None  # 1..12
    topic: str = ""
    category: str = ""
    skill: str = ""
    split: str = ""
    source: str = ""  # where the record came from: "scienceqa", "synthetic", "teacher", ...
    iteration: int | None = None  # calibration iteration that produced it (None: original data)
    meta: dict[str, Any] = field(default_factory=dict)  # anything else (e.g. hidden scene)

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer is None else LETTERS[self.answer]

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def has_context(self) -> bool:
        return bool(self.context.strip())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "record") -> Instance:
        """Build and validate a record from a plain dict (a JSONL line, say).

        Raises ``ValueError`` naming ``where`` and the field on any problem.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        for required in ("id", "question", "choices", "answer"):
            if required not in data:
                raise ValueError(f"{where}: missing field '{required}'")
        inst = cls(**data)
        inst.validate(where)
        return inst

    def validate(self, where: str = "record") -> None:
        where = f"{where} (id {self.id!r})" if where == "record" else where
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"{where}: field 'id' must be a non-empty string")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"{where}: field 'question' must be a non-empty string")
        if not isinstance(self.choices, list) or not all(isinstance(c, str) for c in self.choices):
            raise ValueError(f"{where}: field 'choices' must be a list of strings")
        if self.choices and len(self.choices) > len(LETTERS):
            raise ValueError(f"{where}: field 'choices' has more than {len(LETTERS)} options")
        if self.answer is not None:
            if isinstance(self.answer, bool) or not isinstance(self.answer, int):
                raise ValueError(f"{where}: field 'answer' must be an integer index")
            if not 0 <= self.answer < len(self.choices):
                raise ValueError(
                    f"{where}: field 'answer' = {self.answer} is out of range for "
                    f"{len(self.choices)} choices"
                )
        if self.image is not None and (not isinstance(self.image, str) or not self.image):
            raise ValueError(f"{where}: field 'image' must be a relative path or null")
        if self.grade is not None and self.grade not in GRADE_RANGE:
            raise ValueError(f"{where}: field 'grade' = {self.grade} is not in 1..12")
