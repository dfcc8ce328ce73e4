"""``verify``: the teacher calibrates the labels of what it wrote, and the challenge filter
keeps what the student does not know yet.

1. Self-consistency: the label kept is the majority of the teacher's written label and its
   k sampled answers (kept when at least tau of the k + 1 agree; ``written_vote`` off: of
   the k samples alone), the samples in the format ``verify.prompt`` (rationales,
   CQM-LEA, or the letter alone, CQM-A: whichever the teacher answers best). Dropped:
   ``unverified``.
2. Challenge: an instance the current student already answers like the teacher is
   ``not_challenging``: judged one by one, or (``challenge_by="kind"``) on at least
   ``mastery`` of the instances written for the same kind of seed.
"""

from __future__ import annotations

from collections import Counter

from mmdc.answering import ask
from mmdc.artifacts import GenerationReport
from mmdc.data.record import Instance


def majority(choices: list[int | None]) -> tuple[int | None, float]:
    """The most common parsed answer and its share of all k samples (unparsable count
    against agreement)."""
    parsed = [c for c in choices if c is not None]
    if not parsed:
        return None, 0.0
    value, count = Counter(parsed).most_common(1)[0]
    return value, count / len(choices)


def kind_of(inst: Instance) -> tuple[str, str]:
    """The kind of request an instance was written for: its seed's skill and the mode."""
    return inst.meta.get("seed_skill", inst.skill), inst.meta.get("mode", "same")


def kinds_of(instances: list[Instance], shared: int = 3) -> list[tuple[str, str]]:
    """Each instance's kind: the lecture the teacher wrote with it, where at least
    ``shared`` instances carry that same lecture (a ScienceQA lecture belongs to a skill,
    so it says which skill the instance exercises), otherwise the kind of request it was
    written for. The request alone mixes skills: a pool image that cannot carry the seed's
    skill gets a question of another, and on the built-in task 5 of 18 instances written
    for compare seeds were compare questions, the rest colour, shape and count questions
    the student knew, so the group counted as mastered and compare was not taught again."""
    lectures = [(i.lecture or "").strip() for i in instances]
    count = Counter(lec for lec in lectures if lec)
    return [("lecture", lec) if lec and count[lec] >= shared else kind_of(i)
            for i, lec in zip(instances, lectures, strict=True)]


def mastered_kinds(instances: list[Instance], agrees: list[bool], mastery: float) -> list[bool]:
    """The challenge filter by kind (:func:`kinds_of`): every instance of a kind the student
    answers like the teacher on at least ``mastery`` of its instances counts as not
    challenging, every other instance as challenging. Judged one by one, a student that
    guesses between two answers keeps only the instances it guessed wrong, and learns the
    other answer's bias."""
    kinds = kinds_of(instances)
    by_kind: dict[tuple[str, str], list[bool]] = {}
    for kind, agree in zip(kinds, agrees, strict=True):
        by_kind.setdefault(kind, []).append(agree)
    rate = {k: sum(v) / len(v) for k, v in by_kind.items()}
    return [rate[kind] >= mastery for kind in kinds]




def verify_labels(teacher, candidates: list[tuple[Instance, object]], *, k: int, tau: float,
                  written_vote: bool, verify_prompt: str, max_new_tokens: int, batch_size: int,
                  temperature: float, seed: int, iteration: int, report: GenerationReport,
                  rejected: list[dict]) -> list[tuple[Instance, object]]:
    """The (instance, image) pairs whose label the teacher's votes confirm, each relabelled
    by the majority; the others are counted and added to ``rejected`` as unverified."""
    _, _, parsed = ask(teacher, [i for i, _ in candidates], [img for _, img in candidates],
                       verify_prompt, repeat=k, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, do_sample=temperature > 0,
                       temperature=temperature, seed=seed,
                       desc=f"iter {iteration}: teacher verifies")
    verified: list[tuple[Instance, object]] = []
    for j, (inst, img) in enumerate(candidates):
        votes = parsed[j * k:(j + 1) * k]
        # the label the teacher wrote is its answer too: k + 1 votes (an instance the
        # teacher answers one way when writing and another when asked is suspect: on the
        # built-in task such disagreement marks 40% of the ill-posed instances, 4% of the
        # well-posed ones)
        label, share = majority([inst.answer, *votes] if written_vote else votes)
        inst.meta.update(votes=votes, written_answer=inst.answer, agreement=share)
        if label is None or share < tau:
            report.dropped["unverified"] += 1
            report.count(inst.skill, "unverified")
            rejected.append({"id": inst.id, "reason": "unverified", "record": inst.to_dict()})
            continue
        inst.answer = label  # the teacher's calibrated label
        verified.append((inst, img))
    return verified


def challenge_filter(student, verified: list[tuple[Instance, object]], *, challenge_by: str,
                     mastery: float, batch_size: int, iteration: int,
                     report: GenerationReport, rejected: list[dict]
                     ) -> list[tuple[Instance, object]]:
    """The pairs the student does not answer like the teacher yet (by instance or by kind);
    the others are counted and added to ``rejected`` as not challenging."""
    _, _, parsed = ask(student, [i for i, _ in verified], [img for _, img in verified],
                       "CQM-A", max_new_tokens=8, batch_size=batch_size,
                       desc=f"iter {iteration}: student tries")
    agrees = [choice == inst.answer for (inst, _), choice in zip(verified, parsed)]
    if challenge_by == "kind":
        agrees = mastered_kinds([inst for inst, _ in verified], agrees, mastery)
    accepted = []
    for (inst, img), agree in zip(verified, agrees):
        if agree:
            report.dropped["not_challenging"] += 1
            report.count(inst.skill, "not_challenging")
            rejected.append({"id": inst.id, "reason": "not_challenging",
                             "record": inst.to_dict()})
        else:
            accepted.append((inst, img))
    return accepted
