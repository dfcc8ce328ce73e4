"""Seed selection for ``generate``: which instances the teacher writes from, and on which
unlabelled pool image.

Hard instances (the student fell short) are asked for "a new question of the same kind";
easy ones for "a harder question of the same subject" (Lion's hard/easy seeding), at a
configurable hard share (the loop's default: every seed hard; Lion's 1:1 is 0.5), hard
instances weighted by the teacher's writing yield for their skill (:func:`writing_yield`).
Each seed with an image is paired with an unused image from the pool, drawn among those
that look most like the seed's image in the student's vision tower
(:func:`embed_images`, :func:`rank_by_similarity`) or at random.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mmdc.data.record import Instance


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
