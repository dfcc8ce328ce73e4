"""The calibration loop's steps, one function each (run in order by
:func:`mmdc.calibrate.run`).

Each step computes, writes its artifacts (rank 0 only) and returns its one-line summary;
it runs only when the run folder has not recorded it. Each restore reads a finished step's
artifacts back into the :class:`Loop`, whether the step ran now or in an earlier process.
"""

from __future__ import annotations

import gc
import random

from mmdc import artifacts
from mmdc.data.pool import read_jsonl, read_pool, write_json, write_jsonl, write_pool
from mmdc.journal import journaled
from mmdc.loop import Loop, images_of
from mmdc.models.load import load_configured
from mmdc.roles import (
    evaluate_on,
    loss_words,
    referee,
    student_model,
    teacher_backend,
    train_role,
)
from mmdc.writing import free_images, near_images, refill, write_generation, yield_weights


def step_baseline(loop: Loop) -> str:
    """The student as given (and, when the teacher self-improves, the teacher in both
    formats), on the held-out test, for the report's comparisons."""
    cfg = loop.cfg
    res = evaluate_on(cfg, student_model(cfg, None), loop.test, "baseline: eval student")
    metrics = {"student": {"columns": res.columns, "skills": res.skills}}
    if cfg.improve.enabled:
        metrics.update(_teacher_metrics(loop))
    if loop.main:
        write_json(loop.run_dir / "baseline" / artifacts.METRICS, metrics)
    return f"student {res.accuracy:.2f} on the held-out test"


def step_align(loop: Loop, role: str) -> str:
    from mmdc.stages.align import run_align

    summary = run_align(loop.cfg, role, loop.run_dir / "align" / role)
    if loop.main:  # the adapter named within the run folder, which may move
        write_json(loop.run_dir / "align" / role / artifacts.METRICS,
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
    if cfg.improve.enabled:
        from mmdc.stages.improve import unreliable

        r_rows = answer_pool(loop.teacher(step, "teacher-rationales"), p_inst, p_img,
                             fmt="CQM-LEA", max_new_tokens=cfg.improve.rationale_max_new_tokens,
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
        write_jsonl(it / artifacts.TEACHER_PROBE_ANSWERS, t_rows)
        write_jsonl(it / artifacts.STUDENT_PROBE_ANSWERS, s_rows)
        write_jsonl(it / artifacts.ASSESSMENT, [v.__dict__ for v in verdicts])
        write_json(it / artifacts.ASSESSMENT_SUMMARY, summarize(p_inst, verdicts))
        if self_check is not None:
            write_jsonl(it / artifacts.TEACHER_SELF_ASSESSMENT, self_check)
    hard = sum(v.hard is True for v in verdicts)
    words = f"{hard} of {len(verdicts)} probe questions hard"
    if self_check is not None:
        words += (f"; the teacher unreliable on {sum(r['unreliable'] for r in self_check)} "
                  "(its letter and its rationale disagree)")
    return words


def step_generate(loop: Loop, k: int) -> str:
    """The teacher writes, verifies and filters new instances: seeded from the probes the
    assessment marked hard and easy (targeted), or from random pool instances (random)."""
    from mmdc.stages.seeds import select_seeds

    cfg, it = loop.cfg, loop.it(k)
    accepted, rejected, report = [], [], None
    if cfg.loop.strategy != "none":
        verdicts = {r["id"]: r["hard"] for r in read_jsonl(it / artifacts.ASSESSMENT)}
        by_id = {i.id: i for i in loop.probe.instances}
        rng = random.Random(f"{cfg.seed}-generate-{k}")
        if cfg.loop.strategy == "targeted":
            hard = [by_id[i] for i, h in verdicts.items() if h is True]
            easy = [by_id[i] for i, h in verdicts.items() if h is False]
        else:  # random: the same budget seeded from random pool instances, blind to the
            # student (no challenge filter either): Lion without its referee
            hard, easy = list(loop.pool), []
        seeds = select_seeds(hard, easy, cfg.generate.per_iteration, free_images(loop), rng,
                             cfg.generate.hard_share, near=near_images(loop, hard + easy),
                             hard_weights=yield_weights(loop, k, hard))
        challenge = cfg.verify.challenge and cfg.loop.strategy == "targeted"
        accepted, rejected, report = write_generation(loop, k, "generate", seeds,
                                                       challenge=challenge)
        if challenge:
            refill(loop, k, seeds, accepted, rejected, report, rng)
    if loop.main:
        write_pool(it / artifacts.GENERATED_ACCEPTED, accepted)
        write_jsonl(it / artifacts.GENERATED_REJECTED, rejected)
        write_json(it / artifacts.GENERATION_REPORT,
                   report.to_dict() if report else {"asked": 0, "accepted": 0})
    if report is None:
        return "nothing generated (strategy none)"
    return f"{len(accepted)} of {report.asked} written instances accepted"


def restore_generate(loop: Loop, k: int) -> None:
    new = read_pool(loop.it(k) / artifacts.GENERATED_ACCEPTED)
    loop.generated += new
    loop.used_images.update(i.image for i in new if i.image)


def step_teacher_generate(loop: Loop, k: int) -> str:
    """The self-improving teacher writes instances where it found itself unreliable and
    labels them by the majority of its own sampled rationales."""
    from mmdc.stages.seeds import select_seeds

    cfg, it = loop.cfg, loop.it(k)
    rows = read_jsonl(it / artifacts.TEACHER_SELF_ASSESSMENT)
    by_id = {i.id: i for i in loop.probe.instances}
    weak = [by_id[r["id"]] for r in rows if r["unreliable"]]
    accepted, rejected, report = [], [], None
    if weak and cfg.improve.seeds:
        seeds = select_seeds(weak, [], cfg.improve.seeds, free_images(loop),
                             random.Random(f"{cfg.seed}-teacher-generate-{k}"),
                             near=near_images(loop, weak))
        accepted, rejected, report = write_generation(
            loop, k, "teacher_generate", seeds, challenge=False,
            verify_prompt=cfg.improve.verify_prompt, tau=cfg.improve.tau,
            rationale_tokens=cfg.improve.rationale_max_new_tokens)
    if loop.main:
        write_pool(it / artifacts.TEACHER_GENERATED_ACCEPTED, accepted)
        write_jsonl(it / artifacts.TEACHER_GENERATED_REJECTED, rejected)
        write_json(it / artifacts.TEACHER_GENERATION_REPORT,
                   report.to_dict() if report else {"asked": 0, "accepted": 0})
    return (f"{len(accepted)} of {report.asked} instances for the teacher's own weak spots "
            "labelled by its rationales" if report
            else "the teacher found no weak spot of its own")


def restore_teacher_generate(loop: Loop, k: int) -> None:
    images = read_pool(loop.it(k) / artifacts.TEACHER_GENERATED_ACCEPTED)
    loop.used_images.update(i.image for i in images if i.image)


def step_teacher_update(loop: Loop, k: int) -> str:
    """The teacher learns its direct answers on every instance it has labelled by its
    rationales so far, from where it started (so that updates do not pile up), replaying
    seed-split instances where its own letter and rationale agree."""
    from mmdc.stages.imitate import answer_pool
    from mmdc.stages.improve import replay_set, unreliable, update_rows

    cfg, it, step = loop.cfg, loop.it(k), f"iter_{k}/teacher_update"
    own = [i for j in range(1, k + 1)
           for i in read_pool(loop.it(j) / artifacts.TEACHER_GENERATED_ACCEPTED)]
    replay, losses = [], []
    if own and cfg.improve.replay:
        seeds = [i for i in loop.labelled if i.choices]
        images = images_of(loop, seeds)
        letters = answer_pool(loop.teacher(step), seeds, images, fmt="CQM-A",
                              max_new_tokens=cfg.eval.max_new_tokens,
                              batch_size=cfg.eval.batch_size, desc=f"iter {k}: replay letters")
        rationales = answer_pool(loop.teacher(step, "teacher-rationales"), seeds, images,
                                 fmt="CQM-LEA", max_new_tokens=cfg.improve.rationale_max_new_tokens,
                                 batch_size=cfg.eval.batch_size,
                                 desc=f"iter {k}: replay rationales")
        replay = replay_set(unreliable(seeds, letters, rationales), {i.id: i for i in seeds},
                            cfg.improve.replay, f"{cfg.seed}-teacher-replay-{k}")
        gc.collect()
    if own:
        rows = update_rows(own, images_of(loop, own), replay, images_of(loop, replay))
        losses = train_role(cfg, cfg.teacher, rows, _teacher_start(loop), it / artifacts.TEACHER_ADAPTER,
                            loop.run_dir / "tensorboard" / f"teacher-{k}",
                            cfg.improve.train, label=step,
                            max_length_key="improve.train.max_length")
    if loop.main:
        write_json(it / artifacts.TEACHER_UPDATE,
                   {"instances": len(own), "replay": len(replay), "losses": losses})
    if not own:
        return "nothing for the teacher to learn (no instance of its own labelled)"
    return (f"the teacher learned its letters on the {len(own)} instances it has labelled, "
            f"replaying {len(replay)} it answers consistently, " + loss_words(losses))


def _teacher_start(loop: Loop) -> str | None:
    """Where every teacher update starts: its stage-1 adapter, or the teacher as given."""
    aligned = loop.run_dir / "align" / "teacher" / "adapter"
    return str(aligned) if "teacher" in loop.cfg.align.roles else None


def restore_teacher_update(loop: Loop, k: int) -> None:
    if (loop.it(k) / artifacts.TEACHER_ADAPTER).is_dir():
        loop.teacher_adapter = str(loop.it(k) / artifacts.TEACHER_ADAPTER)


def step_teacher_answers(loop: Loop, k: int) -> str:
    """The teacher answers the instruction pool (cached JSONL) in the format the student
    learns: rationales when it learns them, else the letter alone (a short answer, and the
    toy teacher's best)."""
    from mmdc.stages.imitate import answer_pool, cached_answers

    cfg, pool = loop.cfg, loop.pool
    teacher = loop.teacher(f"iter_{k}/teacher_answers")
    lea = "CQM-LEA" in cfg.imitate.formats

    def answer_all(teacher=teacher):
        return answer_pool(teacher, pool, images_of(loop, pool),
                           fmt="CQM-LEA" if lea else "CQM-A",
                           max_new_tokens=cfg.imitate.max_new_tokens if lea
                           else cfg.eval.max_new_tokens,
                           batch_size=cfg.eval.batch_size, desc=f"iter {k}: teacher answers")

    cached_answers(loop.it(k) / artifacts.TEACHER_ANSWERS, pool, answer_all)
    del teacher
    gc.collect()
    return f"the teacher answered {len(pool)} instances ({len(loop.generated)} generated)"


def step_imitate(loop: Loop, k: int) -> str:
    """The student learns the teacher's answers (LoRA, TRL SFT), generated instances
    weighted ``imitate.generated_weight`` times."""
    from mmdc.stages.imitate import imitation_rows, kd_beta, kd_trainer_class

    cfg, it, pool = loop.cfg, loop.it(k), loop.pool
    answers = read_jsonl(it / artifacts.TEACHER_ANSWERS)
    rows, dropped = imitation_rows(pool, answers, images_of(loop, pool), cfg.imitate.formats,
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
    losses = train_role(cfg, cfg.student, rows, start, it / artifacts.STUDENT_ADAPTER,
                        loop.run_dir / "tensorboard" / f"imitate-{k}", cfg.imitate.train,
                        label=f"iter_{k}/imitate", max_length_key="imitate.train.max_length",
                        **kd)
    del kd
    gc.collect()
    if loop.main:
        write_json(it / artifacts.IMITATE,
                   {"trained_on": len(rows), "dropped_unparsable": dropped, "losses": losses})
    return (f"the student learned {len(rows)} teacher answers ({dropped} unparsable "
            "dropped), " + loss_words(losses))


def restore_imitate(loop: Loop, k: int) -> None:
    loop.adapter = str(loop.it(k) / artifacts.STUDENT_ADAPTER)


def _teacher_metrics(loop: Loop) -> dict:
    """The teacher as given on the held-out test, in the eval format and in its rationale
    format (CQM-LEA): where its letters and its rationales part, before it improves."""
    cfg = loop.cfg
    res = evaluate_on(cfg, journaled(teacher_backend(cfg, None, loop.run_dir), loop.run_dir,
                                     "baseline", "teacher-rationales"),
                      loop.test, "baseline: eval teacher rationales", fmt="CQM-LEA",
                      max_new_tokens=cfg.improve.rationale_max_new_tokens)
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
        write_json(it / artifacts.METRICS, metrics)
    return "held-out test: " + ", ".join(f"{role} {m['columns']['Avg']['acc']:.2f}"
                                         for role, m in metrics.items())
