"""The self-improving teacher (``improve.enabled``), label-free, as in self-consistency
self-training (LMSI, Huang et al. 2022): the teacher finds where its direct answers are
unreliable, writes instances there, labels them by the majority of its own sampled
rationales, and trains its direct answers on those labels, replaying what it already
answers consistently so that nothing else falls. No ground-truth label enters: only the
teacher's own answers.

1. Self-assessment: the teacher answers each probe twice, with the letter alone (CQM-A)
   and with a rationale (CQM-LEA). Where the two disagree, or the rationale reaches no
   answer, one of them is wrong: the teacher is unreliable there (:func:`unreliable`).
2. Generation: those probes seed new instances of the same kind, written and parsed as
   the student's are, and labelled by the majority of k sampled rationales
   (``improve.verify_prompt``; at least ``improve.tau`` of the votes agree).
3. Update (:func:`update_rows`): LoRA on the letters of every instance it has labelled
   so far, with their rationale-majority labels, and on a replay of seed-split instances
   where its letter and its rationale agree (that shared answer as the letter, never the
   split's label), each iteration from where the teacher started, so that updates do not
   pile up.
"""

from __future__ import annotations

import random
from dataclasses import replace

from mmdc.data.record import LETTERS, Instance


def unreliable(instances: list[Instance], letters: list[dict], rationales: list[dict]
               ) -> list[dict]:
    """One row per probe: the teacher's letter (CQM-A) and its rationale's answer
    (CQM-LEA), and whether they disagree (``unreliable``)."""
    out = []
    for inst, a, r in zip(instances, letters, rationales, strict=True):
        out.append({"id": inst.id, "skill": inst.skill, "letter": a["choice"],
                    "rationale": r["choice"],
                    "unreliable": r["choice"] is None or a["choice"] != r["choice"]})
    return out


def replay_set(rows: list[dict], by_id: dict[str, Instance], n: int, seed: str
               ) -> list[Instance]:
    """Up to ``n`` instances where the teacher's letter and rationale agreed, each a copy
    whose answer is that shared answer (not the probe's label), drawn evenly over skills
    so that the common ones do not crowd out the rest."""
    agreed: dict[str, list[Instance]] = {}
    for r in rows:
        if not r["unreliable"]:
            inst = by_id[r["id"]]
            agreed.setdefault(inst.skill, []).append(replace(inst, answer=r["letter"]))
    rng = random.Random(seed)
    for items in agreed.values():
        rng.shuffle(items)
    out: list[Instance] = []
    while len(out) < n and any(agreed.values()):
        for skill in sorted(agreed):
            if agreed[skill] and len(out) < n:
                out.append(agreed[skill].pop())
    return out


def update_rows(own: list[Instance], own_images: list, replay: list[Instance],
                replay_images: list) -> list[dict]:
    """The teacher's update: its direct answers (CQM-A) on the instances it labelled by
    its rationales' majority, and on the replayed ones."""
    from mmdc.training import sft_rows

    instances, images = own + replay, own_images + replay_images
    return sft_rows(instances, images, "CQM-A", [LETTERS[i.answer] for i in instances])
