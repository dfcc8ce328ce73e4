"""``generate``: the teacher writes new instances aimed at the student's weaknesses.

The seeds (which probes, which pool images) come from :mod:`mmdc.stages.seeds`. The
teacher writes one instance per seed; the output is parsed into the canonical record.
Drops, each counted by reason (:data:`mmdc.artifacts.DROP_REASONS`): ``malformed`` (does
not parse), ``duplicate`` (ROUGE-L above the threshold against an instance on the same
image, or against any text-only instance for text-only items: a templated question on a
*new* image is a new instance), then :mod:`mmdc.stages.verify`'s ``unverified`` and
``not_challenging``, and ``over_budget`` past ``max_accepted``.
"""

from __future__ import annotations

from mmdc.artifacts import GenerationReport
from mmdc.data.prompts import build_write_prompt, parse_written
from mmdc.data.record import Instance
from mmdc.stages.seeds import Seed
from mmdc.stages.verify import challenge_filter, verify_labels


def write_prompt(seed: Seed) -> str:
    return build_write_prompt(seed.instance, seed.mode)


def parse_instance(text: str, seed: Seed, iid: str, iteration: int) -> Instance:
    """A teacher-written text -> a validated record (``ValueError`` when malformed)."""
    fields = parse_written(text)
    src = seed.instance
    inst = Instance(
        id=iid, question=fields["question"], choices=fields["choices"], answer=fields["answer"],
        image=seed.image, context=fields["context"], lecture=fields["lecture"],
        solution=fields["solution"],
        subject=src.subject, grade=src.grade if seed.mode == "same" else None,
        topic=src.topic if seed.mode == "same" else "",
        skill=src.skill if seed.mode == "same" else "", split="generated", source="teacher",
        iteration=iteration,
        meta={"seed_id": src.id, "seed_skill": src.skill, "mode": seed.mode, "written": text},
    )
    inst.validate(f"generated instance {iid}")
    return inst


class DuplicateFilter:
    """ROUGE-L near-duplicate check, scoped to instances on the same image: a near-duplicate
    asks a near-identical question (ROUGE-L of question and context above the threshold)
    over mostly the same options (Jaccard of the option sets at least one half). ScienceQA
    asks many questions in one wording whose content lies in the options ("Which word
    would come first in alphabetical order?"): a new instance in a known wording with new
    options is new."""

    def __init__(self, existing: list[Instance], threshold: float = 0.7):
        from rouge_score import rouge_scorer

        self.threshold = threshold
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self._by_image: dict[str | None, list[tuple[str, frozenset]]] = {}
        for inst in existing:
            self.add(inst)

    @staticmethod
    def _key(inst: Instance) -> tuple[str, frozenset]:
        text = f"{inst.question} {inst.context}".strip()
        return text, frozenset(c.strip().lower() for c in inst.choices)

    def add(self, inst: Instance) -> None:
        self._by_image.setdefault(inst.image, []).append(self._key(inst))

    def max_similarity(self, inst: Instance) -> float:
        """The highest ROUGE-L of the question (and context) against the instances on the
        same image whose options mostly overlap this one's."""
        text, options = self._key(inst)
        return max((self._scorer.score(o, text)["rougeL"].fmeasure
                    for o, opts in self._by_image.get(inst.image, [])
                    if len(opts & options) * 2 >= len(opts | options)), default=0.0)

    def is_duplicate(self, inst: Instance) -> bool:
        return self.max_similarity(inst) > self.threshold


def lecture_skills(instances: list[Instance]) -> dict[str, str]:
    """Lecture -> skill, from the labelled (not generated) instances whose lecture belongs
    to one skill only: a ScienceQA lecture says which skill a question exercises."""
    seen: dict[str, set[str]] = {}
    for inst in instances:
        lecture = (inst.lecture or "").strip()
        if lecture and inst.skill and inst.split != "generated":
            seen.setdefault(lecture, set()).add(inst.skill)
    return {lecture: next(iter(s)) for lecture, s in seen.items() if len(s) == 1}


def generate_instances(teacher, student, seeds: list[Seed], load_image, *, existing: list[Instance],
                       iteration: int, k: int = 5, tau: float = 0.6, rouge_threshold: float = 0.7,
                       challenge: bool = True, temperature: float = 0.7,
                       verify_temperature: float | None = None,
                       max_new_tokens: int = 128, batch_size: int = 32, seed: int = 0,
                       max_accepted: int = 0, verify_prompt: str = "CQM-LEA",
                       verify_max_new_tokens: int | None = None, challenge_by: str = "instance",
                       mastery: float = 0.9, first_id: int = 0, written_vote: bool = True
                       ) -> tuple[list[Instance], list[dict], GenerationReport]:
    """Write, parse, filter and verify new instances.

    ``teacher`` and ``student`` are backends (:mod:`mmdc.models.backends`; the student an
    in-process :class:`~mmdc.models.load.Loaded`); ``load_image`` maps a
    relative image path to a PIL image. Instance ids count from ``first_id`` (a refill
    round continues the iteration's numbering). Returns (accepted, rejected rows with their
    drop reason, report)."""
    from mmdc.generation import Request
    report = GenerationReport(asked=len(seeds))
    images = [load_image(s.image) if s.image else None for s in seeds]
    texts = teacher.generate([Request(write_prompt(s), img) for s, img in zip(seeds, images)],
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             do_sample=temperature > 0, temperature=temperature, seed=seed,
                             desc=f"iter {iteration}: teacher writes")
    rejected: list[dict] = []
    dup = DuplicateFilter(existing, rouge_threshold)
    skill_of_lecture = lecture_skills(existing)
    candidates: list[tuple[Instance, object]] = []
    for n, (s, text, img) in enumerate(zip(seeds, texts, images)):
        iid = f"gen-{iteration}-{first_id + n:05d}"
        try:
            inst = parse_instance(text, s, iid, iteration)
        except ValueError as exc:
            report.dropped["malformed"] += 1
            report.count(s.instance.skill if s.mode == "same" else "", "malformed")
            rejected.append({"id": iid, "reason": "malformed", "detail": str(exc), "text": text,
                             "seed_id": s.instance.id})
            continue
        # the skill the question exercises, known from its lecture, not the seed's (an
        # image that cannot carry the seed's skill gets a question of another)
        inst.skill = skill_of_lecture.get(inst.lecture.strip(), inst.skill)
        if dup.is_duplicate(inst):
            report.dropped["duplicate"] += 1
            report.count(inst.skill, "duplicate")
            rejected.append({"id": iid, "reason": "duplicate", "record": inst.to_dict()})
            continue
        dup.add(inst)
        candidates.append((inst, img))
    if not candidates:
        return [], rejected, report
    # self-consistency: k sampled answers from the teacher (stages/verify.py)
    accepted = verify_labels(
        teacher, candidates, k=k, tau=tau, written_vote=written_vote,
        verify_prompt=verify_prompt, max_new_tokens=verify_max_new_tokens or max_new_tokens,
        batch_size=batch_size,
        temperature=temperature if verify_temperature is None else verify_temperature,
        seed=seed + 1, iteration=iteration,
        report=report, rejected=rejected)
    if challenge and accepted:
        accepted = challenge_filter(student, accepted, challenge_by=challenge_by,
                                    mastery=mastery, batch_size=batch_size,
                                    iteration=iteration, report=report, rejected=rejected)
    if max_accepted and len(accepted) > max_accepted:
        for inst, _ in accepted[max_accepted:]:
            report.dropped["over_budget"] += 1
            report.count(inst.skill, "over_budget")
            rejected.append({"id": inst.id, "reason": "over_budget", "record": inst.to_dict()})
        accepted = accepted[:max_accepted]
    for inst, _ in accepted:
        report.count(inst.skill, "accepted")
    report.accepted = len(accepted)
    return [i for i, _ in accepted], rejected, report
