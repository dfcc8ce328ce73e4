"""The calibration loop's steps, one function each (run in order by
:func:`mmdc.calibrate.run`).

Each step computes, writes its artifacts (rank 0 only) and returns its one-line summary;
it runs only when the run folder has not recorded it. Each restore reads a finished step's
artifacts back into the :class:`Loop`, whether the step ran now or in an earlier process.
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mmdc.config import Config
from mmdc.data.images import ImageCache
from mmdc.data.pool import read_jsonl, read_pool, write_json, write_jsonl, write_pool
from mmdc.data.record import Instance
from mmdc.models.load import load_configured
from mmdc.roles import (
    evaluate_on,
    loss_words,
    referee,
    student_model,
    teacher_backend,
    train_role,
)
from mmdc.runstate import RunState, _journaled


@dataclass
class Loop:
    """What the steps of one run share: the config, the run folder and its state, the
    data, and where the loop stands (the current adapters and the generated pool)."""

    cfg: Config
    run_dir: Path
    state: RunState
    main: bool
    seed_split: object
    probe: object
    test: object
    images: ImageCache
    pool_images: list[str]
    labelled: list[Instance]
    adapter: str | None = None  # the student's current adapter
    teacher_adapter: str | None = None
    generated: list[Instance] = field(default_factory=list)
    used_images: set[str] = field(default_factory=set)
    image_vectors: dict = field(default_factory=dict)  # image path -> vision-tower vector

    @property
    def pool(self) -> list[Instance]:
        """The instruction pool: the seed split and every accepted instance so far."""
        return self.labelled + self.generated

    def it(self, k: int) -> Path:
        return self.run_dir / f"iter_{k}"

    def teacher(self, step: str, who: str = "teacher"):
        return _journaled(teacher_backend(self.cfg, self.teacher_adapter, self.run_dir),
                          self.run_dir, step, who)

    def student(self, step: str, adapter: str | None = ...):
        return _journaled(student_model(self.cfg, self.adapter if adapter is ... else adapter),
                          self.run_dir, step, "student")


def _images_of(loop: Loop, instances: list[Instance]) -> list:
    return [loop.images(i.image) for i in instances]


def step_baseline(loop: Loop) -> str:
    """The student as given (and, when the teacher self-improves, the teacher in both
    formats), on the held-out test, for the report's comparisons."""
    cfg = loop.cfg
    res = evaluate_on(cfg, student_model(cfg, None), loop.test, "baseline: eval student")
    metrics = {"student": {"columns": res.columns, "skills": res.skills}}
    if cfg.loop.self_improve:
        metrics.update(_teacher_metrics(loop))
    if loop.main:
        write_json(loop.run_dir / "baseline" / "metrics.json", metrics)
    return f"student {res.accuracy:.2f} on the held-out test"


def step_align(loop: Loop, role: str) -> str:
    from mmdc.stages.align import run_align

    summary = run_align(loop.cfg, role, loop.run_dir / "align" / role)
    if loop.main:  # the adapter named within the run folder, which may move
        write_json(loop.run_dir / "align" / role / "metrics.json",
                   {**summary, "adapter": f"align/{role}/adapter"})
    return (f"{role} LoRA-aligned on {summary['instances']} instances, "
            + loss_words(summary["losses"]))


def step_assess(loop: Loop, k: int) -> str:
    """Teacher and student answer the probe split; the referee marks hard / easy. When the
    teacher self-improves it also answers with rationales, to find where it is unreliable."""
    from mmdc.stages.assess import summarize
    from mmdc.stages.imitate import answer_pool

    cfg, it, step = loop.cfg, loop.it(k), f"iter_{k}/assess"
    p_inst = [i for i in loop.probe.instances if i.choices]
    p_img = [loop.probe.image(i) for i in p_inst]
    short = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    teacher = loop.teacher(step)
    t_rows = answer_pool(teacher, p_inst, p_img, fmt="CQM-A", desc=f"iter {k}: teacher probes",
                         **short)
    self_check = None
    if cfg.loop.self_improve:
        from mmdc.stages.improve import unreliable

        r_rows = answer_pool(loop.teacher(step, "teacher-rationales"), p_inst, p_img,
                             fmt="CQM-LEA", max_new_tokens=cfg.generate.max_new_tokens,
                             batch_size=cfg.eval.batch_size,
                             desc=f"iter {k}: teacher rationales")
        self_check = unreliable(p_inst, t_rows, r_rows)
    del teacher
    gc.collect()
    student = loop.student(step)
    s_rows = answer_pool(student, p_inst, p_img, fmt="CQM-A", desc=f"iter {k}: student probes",
                         **short)
    verdicts = referee(cfg, loop.teacher_adapter, loop.run_dir).judge(
        p_inst, t_rows, s_rows, student_model=student.model, processor=student.processor,
        images=p_img)
    del student
    gc.collect()
    if loop.main:
        write_jsonl(it / "teacher_probe_answers.jsonl", t_rows)
        write_jsonl(it / "student_probe_answers.jsonl", s_rows)
        write_jsonl(it / "assessment.jsonl", [v.__dict__ for v in verdicts])
        write_json(it / "assessment_summary.json", summarize(p_inst, verdicts))
        if self_check is not None:
            write_jsonl(it / "teacher_self_assessment.jsonl", self_check)
    hard = sum(v.hard is True for v in verdicts)
    words = f"{hard} of {len(verdicts)} probe questions hard"
    if self_check is not None:
        words += (f"; the teacher unreliable on {sum(r['unreliable'] for r in self_check)} "
                  "(its letter and its rationale disagree)")
    return words


def _write_generation(loop: Loop, k: int, prefix: str, seeds, *, challenge: bool,
                      max_accepted: int | None = None, first_id: int = 0, also: tuple = (),
                      verify_prompt: str | None = None, tau: float | None = None):
    """Write and verify instances from ``seeds`` (``also``: instances of this iteration
    already kept, for the duplicate filter; ``verify_prompt`` / ``tau`` replace the
    generate section's); (accepted, rejected, report)."""
    from mmdc.stages.generate import generate_instances

    cfg, g = loop.cfg, loop.cfg.generate
    verify_prompt = verify_prompt or g.verify_prompt
    step = f"iter_{k}/{prefix}"
    teacher = loop.teacher(step)
    student = loop.student(step) if challenge else None
    out = generate_instances(
        teacher, student, seeds, loop.images,
        existing=loop.pool + loop.probe.instances + list(also),
        iteration=k, k=g.k, tau=g.tau if tau is None else tau, written_vote=g.written_vote,
        rouge_threshold=g.rouge_threshold, challenge=challenge,
        temperature=g.temperature, max_new_tokens=g.max_new_tokens,
        batch_size=cfg.eval.batch_size, seed=cfg.seed + k + first_id,
        max_accepted=g.max_accepted if max_accepted is None else max_accepted,
        verify_prompt=verify_prompt, challenge_by=g.challenge_by, mastery=g.mastery,
        first_id=first_id,
        verify_max_new_tokens=cfg.eval.max_new_tokens if verify_prompt == "CQM-A" else None)
    del teacher, student
    gc.collect()
    return out


def _free_images(loop: Loop) -> list[str]:
    return [p for p in loop.pool_images if p not in loop.used_images]


def _near(loop: Loop, seeds_from: list[Instance]):
    """``select_seeds``' image ranking (``generate.pair_images=similar``): the free pool
    images and the seeds' images embedded once by the student's vision tower."""
    from mmdc.stages.generate import embed_images, rank_by_similarity

    free = _free_images(loop)
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


def step_generate(loop: Loop, k: int) -> str:
    """The teacher writes, verifies and filters new instances: seeded from the probes the
    assessment marked hard and easy (targeted), or from random pool instances (random)."""
    from mmdc.stages.generate import select_seeds

    cfg, it = loop.cfg, loop.it(k)
    accepted, rejected, report = [], [], None
    if cfg.loop.strategy != "none":
        verdicts = {r["id"]: r["hard"] for r in read_jsonl(it / "assessment.jsonl")}
        by_id = {i.id: i for i in loop.probe.instances}
        rng = random.Random(f"{cfg.seed}-generate-{k}")
        if cfg.loop.strategy == "targeted":
            hard = [by_id[i] for i, h in verdicts.items() if h is True]
            easy = [by_id[i] for i, h in verdicts.items() if h is False]
        else:  # random: the same budget seeded from random pool instances, blind to the
            # student (no challenge filter either): Lion without its referee
            hard, easy = list(loop.pool), []
        seeds = select_seeds(hard, easy, cfg.generate.per_iteration, _free_images(loop), rng,
                             cfg.generate.hard_share, near=_near(loop, hard + easy),
                             hard_weights=_yield_weights(loop, k, hard))
        challenge = cfg.generate.challenge and cfg.loop.strategy == "targeted"
        accepted, rejected, report = _write_generation(loop, k, "generate", seeds,
                                                       challenge=challenge)
        if challenge:
            _refill(loop, k, seeds, accepted, rejected, report, rng)
    if loop.main:
        write_pool(it / "generated_accepted.jsonl", accepted)
        write_jsonl(it / "generated_rejected.jsonl", rejected)
        write_json(it / "generation_report.json",
                   report.to_dict() if report else {"asked": 0, "accepted": 0})
    if report is None:
        return "nothing generated (strategy none)"
    return f"{len(accepted)} of {report.asked} written instances accepted"


def _yield_weights(loop: Loop, k: int, hard: list[Instance]) -> list[float] | None:
    """Each hard seed's weight: the share of the teacher's writing for its skill in the
    earlier iterations that it could verify (``generate.by_yield``, targeted only)."""
    from mmdc.stages.generate import writing_yield

    if not (loop.cfg.generate.by_yield and loop.cfg.loop.strategy == "targeted") or k < 2:
        return None
    rejected = [r for j in range(1, k) for r in read_jsonl(loop.it(j) / "generated_rejected.jsonl")]
    share = writing_yield([i for i in loop.generated if i.iteration < k], rejected)
    return [share.get(i.skill, 1.0) for i in hard]


def _refill(loop: Loop, k: int, seeds, accepted, rejected, report, rng) -> None:
    """Up to ``generate.refill`` more rounds while the challenge filter leaves the
    iteration short of ``generate.max_accepted``: twice the missing count of seeds, from the
    seeds whose instances were kept (:func:`~mmdc.stages.generate.refill_seeds`)."""
    from mmdc.stages.generate import refill_seeds

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
                            [p for p in _free_images(loop) if p not in taken], rng)
        if not more:
            return
        new, dropped, rep = _write_generation(loop, k, f"generate_refill{r}", more,
                                              challenge=True, max_accepted=missing,
                                              first_id=report.asked, also=accepted)
        accepted += new
        rejected += dropped
        report.merge(rep)
        written += more


def restore_generate(loop: Loop, k: int) -> None:
    new = read_pool(loop.it(k) / "generated_accepted.jsonl")
    loop.generated += new
    loop.used_images.update(i.image for i in new if i.image)


def step_teacher_generate(loop: Loop, k: int) -> str:
    """The self-improving teacher writes instances where it found itself unreliable and
    labels them by the majority of its own sampled rationales."""
    from mmdc.stages.generate import select_seeds

    cfg, it = loop.cfg, loop.it(k)
    rows = read_jsonl(it / "teacher_self_assessment.jsonl")
    by_id = {i.id: i for i in loop.probe.instances}
    weak = [by_id[r["id"]] for r in rows if r["unreliable"]]
    accepted, rejected, report = [], [], None
    if weak and cfg.loop.teacher_seeds:
        seeds = select_seeds(weak, [], cfg.loop.teacher_seeds, _free_images(loop),
                             random.Random(f"{cfg.seed}-teacher-generate-{k}"),
                             near=_near(loop, weak))
        accepted, rejected, report = _write_generation(
            loop, k, "teacher_generate", seeds, challenge=False,
            verify_prompt=cfg.loop.teacher_verify_prompt, tau=cfg.loop.teacher_tau)
    if loop.main:
        write_pool(it / "teacher_generated_accepted.jsonl", accepted)
        write_jsonl(it / "teacher_generated_rejected.jsonl", rejected)
        write_json(it / "teacher_generation_report.json",
                   report.to_dict() if report else {"asked": 0, "accepted": 0})
    return (f"{len(accepted)} of {report.asked} instances for the teacher's own weak spots "
            "labelled by its rationales" if report
            else "the teacher found no weak spot of its own")


def restore_teacher_generate(loop: Loop, k: int) -> None:
    images = read_pool(loop.it(k) / "teacher_generated_accepted.jsonl")
    loop.used_images.update(i.image for i in images if i.image)


def step_teacher_update(loop: Loop, k: int) -> str:
    """The teacher learns its direct answers on every instance it has labelled by its
    rationales so far, from where it started (so that updates do not pile up), replaying
    seed-split instances where its own letter and rationale agree."""
    from mmdc.stages.imitate import answer_pool
    from mmdc.stages.improve import replay_set, unreliable, update_rows

    cfg, it, step = loop.cfg, loop.it(k), f"iter_{k}/teacher_update"
    own = [i for j in range(1, k + 1)
           for i in read_pool(loop.it(j) / "teacher_generated_accepted.jsonl")]
    replay, losses = [], []
    if own and cfg.loop.teacher_replay:
        seeds = [i for i in loop.labelled if i.choices]
        images = _images_of(loop, seeds)
        letters = answer_pool(loop.teacher(step), seeds, images, fmt="CQM-A",
                              max_new_tokens=cfg.eval.max_new_tokens,
                              batch_size=cfg.eval.batch_size, desc=f"iter {k}: replay letters")
        rationales = answer_pool(loop.teacher(step, "teacher-rationales"), seeds, images,
                                 fmt="CQM-LEA", max_new_tokens=cfg.generate.max_new_tokens,
                                 batch_size=cfg.eval.batch_size,
                                 desc=f"iter {k}: replay rationales")
        replay = replay_set(unreliable(seeds, letters, rationales), {i.id: i for i in seeds},
                            cfg.loop.teacher_replay, f"{cfg.seed}-teacher-replay-{k}")
        gc.collect()
    if own:
        rows = update_rows(own, _images_of(loop, own), replay, _images_of(loop, replay))
        losses = train_role(cfg, cfg.teacher, rows, _teacher_start(loop), it / "teacher_adapter",
                            loop.run_dir / "tensorboard" / f"teacher-{k}",
                            cfg.loop.teacher_train, label=step,
                            max_length_key="loop.teacher_train.max_length")
    if loop.main:
        write_json(it / "teacher_update.json", {"instances": len(own), "replay": len(replay),
                                                "losses": losses})
    if not own:
        return "nothing for the teacher to learn (no instance of its own labelled)"
    return (f"the teacher learned its letters on the {len(own)} instances it has labelled, "
            f"replaying {len(replay)} it answers consistently, " + loss_words(losses))


def _teacher_start(loop: Loop) -> str | None:
    """Where every teacher update starts: its stage-1 adapter, or the teacher as given."""
    aligned = loop.run_dir / "align" / "teacher" / "adapter"
    return str(aligned) if "teacher" in loop.cfg.align.roles else None


def restore_teacher_update(loop: Loop, k: int) -> None:
    if (loop.it(k) / "teacher_adapter").is_dir():
        loop.teacher_adapter = str(loop.it(k) / "teacher_adapter")


def step_teacher_answers(loop: Loop, k: int) -> str:
    """The teacher answers the instruction pool (cached JSONL) in the format the student
    learns: rationales when it learns them, else the letter alone (a short answer, and the
    toy teacher's best)."""
    from mmdc.stages.imitate import answer_pool, cached_answers

    cfg, pool = loop.cfg, loop.pool
    teacher = loop.teacher(f"iter_{k}/teacher_answers")
    lea = "CQM-LEA" in cfg.imitate.formats

    def answer_all(teacher=teacher):
        return answer_pool(teacher, pool, _images_of(loop, pool),
                           fmt="CQM-LEA" if lea else "CQM-A",
                           max_new_tokens=cfg.imitate.max_new_tokens if lea
                           else cfg.eval.max_new_tokens,
                           batch_size=cfg.eval.batch_size, desc=f"iter {k}: teacher answers")

    cached_answers(loop.it(k) / "teacher_answers.jsonl", pool, answer_all)
    del teacher
    gc.collect()
    return f"the teacher answered {len(pool)} instances ({len(loop.generated)} generated)"


def step_imitate(loop: Loop, k: int) -> str:
    """The student learns the teacher's answers (LoRA, TRL SFT), generated instances
    weighted ``imitate.generated_weight`` times."""
    from mmdc.stages.imitate import imitation_rows, kd_beta, kd_trainer_class

    cfg, it, pool = loop.cfg, loop.it(k), loop.pool
    answers = read_jsonl(it / "teacher_answers.jsonl")
    rows, dropped = imitation_rows(pool, answers, _images_of(loop, pool), cfg.imitate.formats,
                                   {i.id for i in loop.generated},
                                   cfg.imitate.generated_weight)
    aligned = (str(loop.run_dir / "align" / "student" / "adapter")
               if "student" in cfg.align.roles else None)
    start = loop.adapter if cfg.loop.retrain == "continue" else aligned
    kd = {}
    if cfg.imitate.kd != "none":
        im = cfg.imitate
        kd = dict(trainer_class=kd_trainer_class(),
                  teacher_model=load_configured(cfg.teacher, loop.teacher_adapter).model,
                  beta=kd_beta(im.kd, im.kd_beta), temperature=im.kd_temperature,
                  weight=im.kd_weight)
    losses = train_role(cfg, cfg.student, rows, start, it / "student_adapter",
                        loop.run_dir / "tensorboard" / f"imitate-{k}", cfg.imitate.train,
                        label=f"iter_{k}/imitate", max_length_key="imitate.train.max_length",
                        **kd)
    del kd
    gc.collect()
    if loop.main:
        write_json(it / "imitate.json", {"trained_on": len(rows), "dropped_unparsable": dropped,
                                         "losses": losses})
    return (f"the student learned {len(rows)} teacher answers ({dropped} unparsable "
            "dropped), " + loss_words(losses))


def restore_imitate(loop: Loop, k: int) -> None:
    loop.adapter = str(loop.it(k) / "student_adapter")


def _teacher_metrics(loop: Loop) -> dict:
    """The teacher as given on the held-out test, in the eval format and in its rationale
    format (CQM-LEA): where its letters and its rationales part, before it improves."""
    cfg = loop.cfg
    res = evaluate_on(cfg, _journaled(teacher_backend(cfg, None, loop.run_dir), loop.run_dir,
                                      "baseline", "teacher-rationales"),
                      loop.test, "baseline: eval teacher rationales", fmt="CQM-LEA",
                      max_new_tokens=cfg.generate.max_new_tokens)
    base = evaluate_on(cfg, teacher_backend(cfg, None, loop.run_dir), loop.test,
                       "baseline: eval teacher")
    return {"teacher": {"columns": base.columns, "skills": base.skills},
            "teacher_rationales": {"columns": res.columns, "skills": res.skills}}


def step_evaluate(loop: Loop, k: int) -> str:
    """Teacher and student on the held-out test split."""
    cfg, it, step = loop.cfg, loop.it(k), f"iter_{k}/evaluate"
    metrics = {}
    for role in ("teacher", "student"):
        res = evaluate_on(cfg, loop.teacher(step) if role == "teacher" else loop.student(step),
                          loop.test, f"iter {k}: eval {role}")
        if loop.main:
            res.save(it, f"{role}_test")
        metrics[role] = {"columns": res.columns, "skills": res.skills}
    if loop.main:
        write_json(it / "metrics.json", metrics)
    return "held-out test: " + ", ".join(f"{role} {m['columns']['Avg']['acc']:.2f}"
                                         for role, m in metrics.items())
