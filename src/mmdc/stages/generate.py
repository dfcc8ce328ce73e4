"""``generate``: the teacher writes new instances aimed at the student's weaknesses, and
verifies its own labels (the self-improving teacher's calibration).

1. Seeds: hard instances (the student fell short) are asked for "a new question of the
   same kind"; easy ones for "a harder question of the same subject" (Lion's hard/easy
   seeding), at a configurable hard share (the loop's default: every seed hard; Lion's
   1:1 is 0.5), hard instances weighted by the teacher's writing yield for their skill
   (:func:`writing_yield`). Each seed with an image is paired with an unused image from
   the unlabelled pool.
2. The teacher writes; the output is parsed into the canonical record. Drops, each counted
   by reason: ``malformed`` (does not parse), ``duplicate`` (ROUGE-L above the threshold
   against an instance on the same image, or against any text-only instance for text-only
   items: a templated question on a *new* image is a new instance), ``unverified`` (the
   teacher's k sampled answers agree less than tau), ``not_challenging`` (the current
   student already answers like the teacher: one by one, or, ``challenge_by="kind"``, on
   at least ``mastery`` of the instances written for the same kind of seed).
3. Calibration: the label kept is the majority of the teacher's written label and its k
   sampled answers (kept when at least tau of the k + 1 agree; ``written_vote`` off: of
   the k samples alone), the samples in the format ``verify_prompt`` (rationales,
   CQM-LEA, or the letter alone, CQM-A: whichever the teacher answers best).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from mmdc.data.record import Instance
from mmdc.prompts import build_write_prompt, parse_written

DROP_REASONS = ("malformed", "duplicate", "unverified", "not_challenging", "over_budget")


@dataclass
class Seed:
    instance: Instance
    mode: str  # "same" (hard seed) or "rarer" (easy seed)
    image: str | None  # pool image (relative path) for the new instance, None: text-only


def select_seeds(hard: list[Instance], easy: list[Instance], n: int, pool_images: list[str],
                 rng: random.Random, hard_share: float = 0.5, near=None,
                 nearest: float = 0.1, hard_weights: list[float] | None = None) -> list[Seed]:
    """Pick ``n`` seeds, ``hard_share`` of them hard, each image seed paired with a distinct
    unused pool image. Seeds are drawn with replacement: a hard instance seeds several new
    ones, each on its own image, so that a few hard probes still fill the hard share (the
    assessment of a good student finds few). With no easy instances every seed is hard,
    and the other way round. ``near(seed_image, free_images)``, when given, ranks the free
    images by how alike they look to the seed's image (:func:`rank_by_similarity`), and
    the image is drawn from the ``nearest`` share of them; otherwise any free image. The
    share is wide on purpose: the few nearest images repeat the seed's own answer (a hard
    probe's magnets that attract are nearest to magnets that attract), and new instances
    that all share their seeds' answers teach the student a bias. ``hard_weights``, one per
    hard instance, makes some more likely to be drawn (:func:`writing_yield`)."""
    n_hard = round(n * hard_share) if easy else n
    n_hard = n_hard if hard else 0
    n_easy = n - n_hard if easy else 0
    picks = [(s, "same") for s in rng.choices(hard, weights=hard_weights, k=n_hard)] \
        if hard else []
    picks += [(s, "rarer") for s in rng.choices(easy, k=n_easy)] if easy else []
    free = list(pool_images)
    rng.shuffle(free)
    seeds = []
    for inst, mode in picks:
        image = None
        if inst.image is not None:
            if not free:
                continue  # the pool is used up
            if near is None:
                image = free.pop()
            else:
                image = rng.choice(near(inst.image, free)[:max(1, round(nearest * len(free)))])
                free.remove(image)
        seeds.append(Seed(inst, mode, image))
    return seeds


def writing_yield(accepted: list[Instance], rejected: list[dict]) -> dict[str, float]:
    """Per skill, how much of what the teacher wrote for hard seeds of that skill it could
    verify: (verified + 1) / (verified + unverified + 2), from earlier iterations'
    accepted instances and rejected rows (verified: accepted, or dropped after
    verification as not challenging or over budget). Hard seeds drawn in proportion to it
    spend the teacher's writing where it can label what it writes: on the built-in task
    its spatial questions name the shape's row and column, which it misreads, and it
    verified 5 of 21 of them in the first iteration (compare 17 of 19)."""
    counts: dict[str, list[int]] = {}
    rows = [(i.meta, True) for i in accepted] + [
        ((r.get("record") or {}).get("meta") or {}, r["reason"] != "unverified")
        for r in rejected if r.get("reason") in ("unverified", "not_challenging", "over_budget")]
    for meta, verified in rows:
        if meta.get("mode") == "same" and meta.get("seed_skill"):
            c = counts.setdefault(meta["seed_skill"], [0, 0])
            c[0] += verified
            c[1] += 1
    return {skill: (v + 1) / (n + 2) for skill, (v, n) in counts.items()}


def refill_seeds(accepted: list[Instance], seeds: list[Seed], n: int, pool_images: list[str],
                 rng: random.Random) -> list[Seed]:
    """Seeds for another round of writing when the challenge filter left the iteration
    short of its cap: the seeds whose instances were kept (kinds the student has not
    mastered), drawn with replacement as :func:`select_seeds` draws, each on a free pool
    image. On the built-in task with its first image pool the filter dropped the kinds the
    student had learnt (count_color, magnets) in the third iteration and kept 43 instances
    of a cap of 96 (compare, spatial): the freed budget goes to more of what the student
    still gets wrong."""
    by_key = {(s.instance.id, s.mode): s.instance for s in seeds}
    keys = [(i.meta.get("seed_id"), i.meta.get("mode")) for i in accepted]
    hard = [by_key[key] for key in keys if key in by_key and key[1] == "same"]
    easy = [by_key[key] for key in keys if key in by_key and key[1] == "rarer"]
    if not (hard or easy) or n <= 0:
        return []
    return select_seeds(hard, easy, n, pool_images, rng, len(hard) / (len(hard) + len(easy)))


def embed_images(model, processor, images: list, batch_size: int = 64):
    """Unit vectors of images in the model's vision tower (its last hidden states, averaged
    over the patches): the tower is frozen in LLaVA's recipe and shared by a 7B and a 13B."""
    import torch

    tower = model.model.vision_tower
    param = next(tower.parameters())
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(images[start:start + batch_size],
                                           return_tensors="pt")["pixel_values"]
        if pixels.dim() == 5:  # LLaVA-NeXT: tiles of each image, the whole image first
            pixels = pixels[:, 0]
        with torch.no_grad():
            hidden = tower(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state
        out.append(torch.nn.functional.normalize(hidden.float().mean(1), dim=-1).cpu())
    return list(torch.cat(out)) if out else []


def rank_by_similarity(vectors: dict, seed_image: str, free: list[str]) -> list[str]:
    """``free`` images, the most alike to ``seed_image`` first (cosine of ``vectors``)."""
    import torch

    sims = torch.stack([vectors[p] for p in free]) @ vectors[seed_image]
    return [free[i] for i in sims.argsort(descending=True, stable=True).tolist()]


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


def majority(choices: list[int | None]) -> tuple[int | None, float]:
    """The most common parsed answer and its share of all k samples (unparsable count
    against agreement)."""
    parsed = [c for c in choices if c is not None]
    if not parsed:
        return None, 0.0
    value, count = Counter(parsed).most_common(1)[0]
    return value, count / len(choices)


def lecture_skills(instances: list[Instance]) -> dict[str, str]:
    """Lecture -> skill, from the labelled (not generated) instances whose lecture belongs
    to one skill only: a ScienceQA lecture says which skill a question exercises."""
    seen: dict[str, set[str]] = {}
    for inst in instances:
        lecture = (inst.lecture or "").strip()
        if lecture and inst.skill and inst.split != "generated":
            seen.setdefault(lecture, set()).add(inst.skill)
    return {lecture: next(iter(s)) for lecture, s in seen.items() if len(s) == 1}


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


@dataclass
class GenerationReport:
    asked: int = 0
    accepted: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_skill: dict = field(default_factory=dict)

    def merge(self, other: GenerationReport) -> None:
        """Add another round's counts (a refill of the same iteration)."""
        self.asked += other.asked
        self.accepted += other.accepted
        self.dropped.update(other.dropped)
        for skill, counts in other.per_skill.items():
            self.per_skill.setdefault(skill, Counter()).update(counts)

    def count(self, skill: str, outcome: str) -> None:
        self.per_skill.setdefault(skill or "(unknown)", Counter())[outcome] += 1

    def to_dict(self) -> dict:
        return {"asked": self.asked, "accepted": self.accepted,
                "dropped": {r: self.dropped.get(r, 0) for r in DROP_REASONS},
                "per_skill": {k: dict(v) for k, v in sorted(self.per_skill.items())}}


def generate_instances(teacher, student, seeds: list[Seed], load_image, *, existing: list[Instance],
                       iteration: int, k: int = 5, tau: float = 0.6, rouge_threshold: float = 0.7,
                       challenge: bool = True, temperature: float = 0.7,
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
    from mmdc.prompts import build_prompt, parse_answer

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
    # self-consistency: k sampled rationale answers from the teacher
    requests = [Request(build_prompt(i, verify_prompt), img) for i, img in candidates
                for _ in range(k)]
    samples = teacher.generate(requests, max_new_tokens=verify_max_new_tokens or max_new_tokens,
                               batch_size=batch_size,
                               do_sample=temperature > 0, temperature=temperature,
                               seed=seed + 1, desc=f"iter {iteration}: teacher verifies")
    verified: list[tuple[Instance, object]] = []
    for j, (inst, img) in enumerate(candidates):
        votes = [parse_answer(t, len(inst.choices)) for t in samples[j * k:(j + 1) * k]]
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
    accepted = verified
    if challenge and verified:
        outs = student.generate([Request(build_prompt(i, "CQM-A"), img) for i, img in verified],
                                max_new_tokens=8, batch_size=batch_size, desc=f"iter {iteration}: student tries")
        agrees = [parse_answer(out, len(inst.choices)) == inst.answer
                  for (inst, _), out in zip(verified, outs)]
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
