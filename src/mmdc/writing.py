"""How the loop's writing steps (``generate``, ``teacher_generate``) call the teacher: the
free pool images, the seeds' image ranking, the seed weights by writing yield, one round of
writing and verifying (:func:`mmdc.stages.generate.generate_instances`), and the refill
rounds. Each function takes the run's :class:`mmdc.steps.Loop`.
"""

from __future__ import annotations

import gc
from functools import partial

from mmdc import artifacts
from mmdc.data.pool import read_jsonl
from mmdc.data.record import Instance
from mmdc.loop import Loop
from mmdc.models.load import load_configured


def write_generation(loop: Loop, k: int, prefix: str, seeds, *, challenge: bool,
                     max_accepted: int | None = None, first_id: int = 0, also: tuple = (),
                     verify_prompt: str | None = None, tau: float | None = None,
                     rationale_tokens: int | None = None):
    """Write and verify instances from ``seeds`` (``also``: instances of this iteration
    already kept, for the duplicate filter; ``verify_prompt`` / ``tau`` replace the verify
    section's, ``rationale_tokens`` the length of rationale votes, by default
    ``generate.max_new_tokens``); (accepted, rejected, report)."""
    from mmdc.stages.generate import generate_instances

    cfg, g, v = loop.cfg, loop.cfg.generate, loop.cfg.verify
    verify_prompt = verify_prompt or v.prompt
    step = f"iter_{k}/{prefix}"
    teacher = loop.teacher(step)
    student = loop.student(step) if challenge else None
    out = generate_instances(
        teacher, student, seeds, loop.images,
        existing=loop.pool + loop.probe.instances + list(also),
        iteration=k, k=v.k, tau=v.tau if tau is None else tau, written_vote=v.written_vote,
        rouge_threshold=g.rouge_threshold, challenge=challenge,
        temperature=g.temperature, verify_temperature=v.temperature,
        max_new_tokens=g.max_new_tokens,
        batch_size=cfg.eval.batch_size, seed=cfg.seed + k + first_id,
        max_accepted=g.max_accepted if max_accepted is None else max_accepted,
        verify_prompt=verify_prompt, challenge_by=v.challenge_by, mastery=v.mastery,
        first_id=first_id,
        verify_max_new_tokens=cfg.eval.max_new_tokens if verify_prompt == "CQM-A"
        else rationale_tokens)
    del teacher, student
    gc.collect()
    return out


def free_images(loop: Loop) -> list[str]:
    return [p for p in loop.pool_images if p not in loop.used_images]


def near_images(loop: Loop, seeds_from: list[Instance]):
    """``select_seeds``' image ranking (``generate.pair_images=similar``): the free pool
    images and the seeds' images embedded once by the student's vision tower."""
    from mmdc.stages.seeds import embed_images, rank_by_similarity

    free = free_images(loop)
    if loop.cfg.generate.pair_images == "random" or not free:
        return None
    paths = free + [i.image for i in seeds_from if i.image]
    need = [p for p in dict.fromkeys(paths) if p not in loop.image_vectors]
    if need:
        loaded = load_configured(loop.cfg.student)
        loop.image_vectors.update(zip(need, embed_images(
            loaded.model, loaded.processor, [loop.images(p) for p in need]), strict=True))
        del loaded
        gc.collect()
    return partial(rank_by_similarity, loop.image_vectors)


def yield_weights(loop: Loop, k: int, hard: list[Instance]) -> list[float] | None:
    """Each hard seed's weight: the share of the teacher's writing for its skill in the
    earlier iterations that it could verify (``generate.by_yield``, targeted only)."""
    from mmdc.stages.seeds import writing_yield

    if not (loop.cfg.generate.by_yield and loop.cfg.loop.strategy == "targeted") or k < 2:
        return None
    rejected = [r for j in range(1, k) for r in read_jsonl(loop.it(j) / artifacts.GENERATED_REJECTED)]
    share = writing_yield([i for i in loop.generated if i.iteration < k], rejected)
    return [share.get(i.skill, 1.0) for i in hard]


def refill(loop: Loop, k: int, seeds, accepted, rejected, report, rng) -> None:
    """Up to ``generate.refill`` more rounds while the challenge filter leaves the
    iteration short of ``generate.max_accepted``: twice the missing count of seeds, from the
    seeds whose instances were kept (:func:`~mmdc.stages.seeds.refill_seeds`)."""
    from mmdc.stages.seeds import refill_seeds

    g = loop.cfg.generate
    if not g.max_accepted:
        return
    written = list(seeds)
    for r in range(1, g.refill + 1):
        missing = g.max_accepted - len(accepted)
        if missing <= 0:
            return
        taken = {s.image for s in written}
        more = refill_seeds(accepted, written, 2 * missing,
                            [p for p in free_images(loop) if p not in taken], rng)
        if not more:
            return
        new, dropped, rep = write_generation(loop, k, f"generate_refill{r}", more,
                                              challenge=True, max_accepted=missing,
                                              first_id=report.asked, also=accepted)
        accepted += new
        rejected += dropped
        report.merge(rep)
        written += more
