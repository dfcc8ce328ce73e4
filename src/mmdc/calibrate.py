"""The distillation-calibration loop, end to end, resumable by step.

    baseline                  the student as given, on the held-out test (for the report)
    align                     stage 1: LoRA-align the student on the seed split
    iter_k/assess             teacher and student answer the probe split; the referee
                              marks hard / easy
    iter_k/generate           the teacher writes, verifies and filters new instances
                              seeded from hard and easy probes; accepted ones join the pool
    iter_k/teacher_update     (loop.self_improve) the teacher learns its verified instances
    iter_k/teacher_answers    the teacher answers the instruction pool (cached JSONL)
    iter_k/imitate            the student learns the teacher's answers (LoRA, TRL SFT)
    iter_k/evaluate           teacher and student on the held-out test split

As in MmDC, each iteration assesses the student, has the teacher write instances aimed at
its weaknesses, and then trains the student on them.

Every step writes its artifacts atomically into the run folder and is then recorded in
``state.json``; a rerun into the same folder skips finished steps and reads their
artifacts back.
"""

from __future__ import annotations

import gc
import logging
import random
from pathlib import Path

from mmdc.config import Config, save_resolved
from mmdc.data.images import ImageCache, check_images
from mmdc.data.load import load_split_collective, read_image_pool
from mmdc.data.pool import (
    ensure_dir,
    read_jsonl,
    read_pool,
    write_json,
    write_jsonl,
    write_pool,
)
from mmdc.data.record import Instance
from mmdc.evaluation import evaluate
from mmdc.models.load import load_configured
from mmdc.report import write_report
from mmdc.runstate import (  # noqa: F401 - changed_keys is part of this module's API
    RunState,
    _journaled,
    changed_keys,
    check_resumable,
    model_fingerprints,
)

log = logging.getLogger(__name__)


def _loss_words(losses: list[float]) -> str:
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss logged"


def _evaluate(cfg: Config, generator, test, desc: str):
    """``generator`` on the held-out test split with the eval settings; pass it inline, so
    that it is released (this holds the last reference) before the next model loads."""
    res = evaluate(generator, test, fmt=cfg.eval.prompt, batch_size=cfg.eval.batch_size,
                   max_new_tokens=cfg.eval.max_new_tokens, limit=cfg.eval.limit, desc=desc)
    del generator
    gc.collect()
    return res


def _load(mcfg, adapter: str | None = None):
    return load_configured(mcfg, adapter=adapter)


def _train_role(cfg: Config, mcfg, rows: list[dict], start_adapter: str | None, out: Path,
                role_dir: Path, train_cfg, label: str | None = None,
                **trainer_kwargs) -> list[float]:
    """LoRA-train a role (continuing ``start_adapter`` when given) and save the adapter."""
    from transformers import set_seed

    from mmdc.models.load import load_adapter
    from mmdc.stages.align import apply_lora, train_sft

    set_seed(cfg.seed)  # LoRA init and data order must not depend on what ran before
    loaded = _load(mcfg)
    model = loaded.model
    if start_adapter:
        model = load_adapter(model, start_adapter, is_trainable=True)
    else:
        model = apply_lora(model, cfg.align.lora)
    history = train_sft(model, loaded.processor, rows, out, train_cfg,
                        logging_dir=role_dir, seed=cfg.seed, label=label, **trainer_kwargs)
    return [h["loss"] for h in history if "loss" in h]


def _teacher(cfg: Config, teacher_adapter: str | None, run_dir: Path):
    """The teacher as its configured backend (in-process, a served endpoint or vLLM),
    its generation shared out over the ranks when there are several."""
    from mmdc.distributed import Sharded
    from mmdc.models.backends import load_backend

    if cfg.teacher.backend == "hf":
        return Sharded(_load(cfg.teacher, teacher_adapter))
    return Sharded(load_backend(cfg.teacher, cache_dir=run_dir / "cache"))


def _student(cfg: Config, adapter: str | None):
    """The student for generation (answers, probes, evaluation), sharded over the ranks."""
    from mmdc.distributed import Sharded

    return Sharded(_load(cfg.student, adapter))


def _referee(cfg: Config, teacher_adapter: str | None, run_dir: Path):
    from mmdc.config import ModelConfig
    from mmdc.stages.assess import AnswerAgreement, JudgeReferee, LikelihoodHardness

    a = cfg.assess
    if a.referee == "likelihood":
        return LikelihoodHardness(a.likelihood_threshold)
    if a.referee == "judge":
        if a.judge == "teacher":
            judge = _teacher(cfg, teacher_adapter, run_dir)
        elif a.judge == "student":
            judge = _student(cfg, None)
        else:
            from mmdc.distributed import Sharded

            judge = Sharded(_load(ModelConfig(path=a.judge)))
        return JudgeReferee(judge, a.judge_threshold, a.judge_retries)
    return AnswerAgreement()


def run(cfg: Config) -> Path:
    from mmdc.stages.align import run_align, sft_rows
    from mmdc.stages.assess import summarize
    from mmdc.stages.generate import generate_instances, select_seeds
    from mmdc.stages.imitate import (
        answer_pool,
        cached_answers,
        check_kd_compatible,
        imitation_rows,
        kd_beta,
        kd_trainer_class,
    )

    if cfg.imitate.kd != "none":  # fail at start-up, not after hours of work
        check_kd_compatible(cfg.teacher.path, cfg.student.path)
    from mmdc import distributed

    main = distributed.is_main()  # rank 0 writes the run folder; every rank computes
    run_dir = ensure_dir(cfg.run_dir, "run_dir")
    check_resumable(cfg, run_dir)  # the config and every model the finished steps used
    state = RunState(run_dir)
    state.check_models(model_fingerprints(cfg))
    if main:
        save_resolved(cfg, run_dir)
    seed_split = load_split_collective(cfg.data, cfg.data.seed_split)
    probe = load_split_collective(cfg.data, cfg.data.probe_split)
    test = load_split_collective(cfg.data, cfg.data.test_split)
    images = ImageCache(seed_split.root)
    pool_images = ([r["image"] for r in read_image_pool(seed_split.root, cfg.data.pool)]
                   if cfg.data.pool else [])
    if cfg.loop.strategy != "none" and pool_images:  # a bad pool image: say so now
        check_images(seed_split.root, pool_images, str(seed_split.root / f"{cfg.data.pool}.jsonl"))
    if cfg.loop.strategy != "none" and not pool_images and main:
        log.warning("no unlabelled image pool (data.pool): the teacher can only write "
                    "text-only instances; seeds with an image are skipped")
    labelled = [i for i in seed_split.instances if i.answer is not None]
    tb = run_dir / "tensorboard"
    if not state.done:  # sizes that cannot fit are refused before any work starts
        from mmdc.stages.lengths import check_lengths

        check_lengths(cfg, seed_split, [probe, test])

    if "baseline" not in state:  # the student as given, for the report's comparisons
        res = _evaluate(cfg, _student(cfg, None), test, "baseline: eval student")
        if main:
            write_json(run_dir / "baseline" / "metrics.json",
                       {"student": {"columns": res.columns, "skills": res.skills}})
        state.mark("baseline", f"student {res.accuracy:.2f} on the held-out test")
    align_adapter = run_dir / "align" / "student" / "adapter"
    for role in ("student", "teacher"):  # stage 1 for the roles the config names
        if role in cfg.align.roles and f"align/{role}" not in state and not (
                role == "student" and "align" in state):
            summary = run_align(cfg, role, run_dir / "align" / role)
            if main:
                write_json(run_dir / "align" / role / "metrics.json", summary)
            state.mark("align" if role == "student" else f"align/{role}",
                       f"{role} LoRA-aligned on {summary['instances']} instances, "
                       + _loss_words(summary["losses"]))
    adapter = str(align_adapter) if "student" in cfg.align.roles else None
    teacher_adapter = (str(run_dir / "align" / "teacher" / "adapter")
                       if "teacher" in cfg.align.roles else None)
    generated: list[Instance] = []
    used_images: set[str] = set()
    for k in range(1, cfg.loop.iterations + 1):
        it = run_dir / f"iter_{k}"
        pool = labelled + generated
        # -- assess on the probe split
        if f"iter_{k}/assess" not in state:
            p_inst = [i for i in probe.instances if i.choices]
            p_img = [probe.image(i) for i in p_inst]
            teacher = _journaled(_teacher(cfg, teacher_adapter, run_dir), run_dir,
                                 f"iter_{k}/assess", "teacher")
            t_rows = answer_pool(teacher, p_inst, p_img, fmt="CQM-A",
                                 max_new_tokens=cfg.eval.max_new_tokens,
                                 batch_size=cfg.eval.batch_size, desc=f"iter {k}: teacher probes")
            del teacher
            gc.collect()
            student = _journaled(_student(cfg, adapter), run_dir, f"iter_{k}/assess",
                                 "student")
            s_rows = answer_pool(student, p_inst, p_img, fmt="CQM-A",
                                 max_new_tokens=cfg.eval.max_new_tokens,
                                 batch_size=cfg.eval.batch_size, desc=f"iter {k}: student probes")
            verdicts = _referee(cfg, teacher_adapter, run_dir).judge(
                p_inst, t_rows, s_rows, student_model=student.model,
                processor=student.processor, images=p_img)
            del student
            gc.collect()
            if main:
                write_jsonl(it / "teacher_probe_answers.jsonl", t_rows)
                write_jsonl(it / "student_probe_answers.jsonl", s_rows)
                write_jsonl(it / "assessment.jsonl", [v.__dict__ for v in verdicts])
                write_json(it / "assessment_summary.json", summarize(p_inst, verdicts))
            hard = sum(v.hard is True for v in verdicts)
            state.mark(f"iter_{k}/assess", f"{hard} of {len(verdicts)} probe questions hard")
        # -- generate: new instances aimed at the student's weaknesses
        if f"iter_{k}/generate" not in state:
            accepted, rejected, report = [], [], None
            if cfg.loop.strategy != "none":
                verdicts = {r["id"]: r["hard"] for r in read_jsonl(it / "assessment.jsonl")}
                by_id = {i.id: i for i in probe.instances}
                rng = random.Random(f"{cfg.seed}-generate-{k}")
                free = [p for p in pool_images if p not in used_images]
                if cfg.loop.strategy == "targeted":
                    hard = [by_id[i] for i, h in verdicts.items() if h is True]
                    easy = [by_id[i] for i, h in verdicts.items() if h is False]
                else:  # random: the same budget seeded from random pool instances
                    hard, easy = list(pool), []
                seeds = select_seeds(hard, easy, cfg.generate.per_iteration, free, rng,
                                     cfg.generate.hard_share)
                step = f"iter_{k}/generate"
                teacher = _journaled(_teacher(cfg, teacher_adapter, run_dir), run_dir, step,
                                     "teacher")
                student = _journaled(_student(cfg, adapter), run_dir, step, "student")
                g = cfg.generate
                accepted, rejected, report = generate_instances(
                    teacher, student, seeds, images, existing=pool + probe.instances,
                    iteration=k, k=g.k, tau=g.tau, rouge_threshold=g.rouge_threshold,
                    challenge=g.challenge, temperature=g.temperature,
                    max_new_tokens=g.max_new_tokens, batch_size=cfg.eval.batch_size,
                    seed=cfg.seed + k, max_accepted=g.max_accepted,
                    verify_prompt=g.verify_prompt,
                    verify_max_new_tokens=(cfg.eval.max_new_tokens
                                           if g.verify_prompt == "CQM-A" else None))
                del teacher, student
                gc.collect()
            if main:
                write_pool(it / "generated_accepted.jsonl", accepted)
                write_jsonl(it / "generated_rejected.jsonl", rejected)
                write_json(it / "generation_report.json",
                           report.to_dict() if report else {"asked": 0, "accepted": 0})
            state.mark(f"iter_{k}/generate", f"{len(accepted)} of {report.asked} written "
                       "instances accepted" if report else "nothing generated (strategy none)")
        new = read_pool(it / "generated_accepted.jsonl")
        generated += new
        used_images.update(i.image for i in new if i.image)
        # -- the self-improving teacher learns its own verified instances
        if cfg.loop.self_improve and new:
            if f"iter_{k}/teacher_update" not in state:
                rows = sft_rows(new, [images(i.image) for i in new], "CQM-LEA")
                losses = _train_role(cfg, cfg.teacher, rows, teacher_adapter,
                                     it / "teacher_adapter", tb / f"teacher-{k}",
                                     cfg.loop.teacher_train, label=f"iter_{k}/teacher_update",
                                     max_length_key="loop.teacher_train.max_length")
                if main:
                    write_json(it / "teacher_update.json", {"trained_on": len(rows), "losses": losses})
                state.mark(f"iter_{k}/teacher_update", f"the teacher learned {len(rows)} "
                           "verified instances, " + _loss_words(losses))
            teacher_adapter = str(it / "teacher_adapter")
        pool = labelled + generated  # the seed split and every accepted instance so far
        # -- the teacher answers the instruction pool
        if f"iter_{k}/teacher_answers" not in state:
            teacher = _journaled(_teacher(cfg, teacher_adapter, run_dir), run_dir,
                                 f"iter_{k}/teacher_answers", "teacher")

            # the teacher answers in the format the student learns: rationales when it
            # learns them, else the letter alone (a short answer, and the toy teacher's best)
            lea = "CQM-LEA" in cfg.imitate.formats

            def answer_all(t=teacher, items=pool, k=k, lea=lea):
                return answer_pool(t, items, [images(i.image) for i in items],
                                   fmt="CQM-LEA" if lea else "CQM-A",
                                   max_new_tokens=(cfg.imitate.max_new_tokens if lea
                                                   else cfg.eval.max_new_tokens),
                                   batch_size=cfg.eval.batch_size,
                                   desc=f"iter {k}: teacher answers")

            cached_answers(it / "teacher_answers.jsonl", pool, answer_all)
            del teacher
            gc.collect()
            state.mark(f"iter_{k}/teacher_answers",
                       f"the teacher answered {len(pool)} instances ({len(generated)} generated)")
        answers = read_jsonl(it / "teacher_answers.jsonl")
        # -- imitate: the student learns them
        student_adapter = it / "student_adapter"
        if f"iter_{k}/imitate" not in state:
            rows, dropped = imitation_rows(pool, answers, [images(i.image) for i in pool],
                                           cfg.imitate.formats, {i.id for i in generated},
                                           cfg.imitate.generated_weight)
            start = adapter if cfg.loop.retrain == "continue" else (
                str(align_adapter) if "student" in cfg.align.roles else None)
            kd = {}
            if cfg.imitate.kd != "none":
                im = cfg.imitate
                kd = dict(trainer_class=kd_trainer_class(),
                          teacher_model=_load(cfg.teacher, teacher_adapter).model,
                          beta=kd_beta(im.kd, im.kd_beta), temperature=im.kd_temperature,
                          weight=im.kd_weight)
            losses = _train_role(cfg, cfg.student, rows, start, student_adapter,
                                 tb / f"imitate-{k}", cfg.imitate.train,
                                 label=f"iter_{k}/imitate",
                                 max_length_key="imitate.train.max_length", **kd)
            del kd
            gc.collect()
            if main:
                write_json(it / "imitate.json", {"trained_on": len(rows), "dropped_unparsable": dropped,
                                                 "losses": losses})
            state.mark(f"iter_{k}/imitate", f"the student learned {len(rows)} teacher answers "
                       f"({dropped} unparsable dropped), " + _loss_words(losses))
        adapter = str(student_adapter)
        # -- evaluate on the held-out test split
        if f"iter_{k}/evaluate" not in state:
            metrics = {}
            for role in ("teacher", "student"):
                res = _evaluate(cfg, _journaled(
                    _teacher(cfg, teacher_adapter, run_dir) if role == "teacher"
                    else _student(cfg, adapter), run_dir, f"iter_{k}/evaluate", role),
                    test, f"iter {k}: eval {role}")
                if main:
                    res.save(it, f"{role}_test")
                metrics[role] = {"columns": res.columns, "skills": res.skills}
            if main:
                write_json(it / "metrics.json", metrics)
            state.mark(f"iter_{k}/evaluate", "held-out test: " + ", ".join(
                f"{role} {m['columns']['Avg']['acc']:.2f}" for role, m in metrics.items()))
    if main:
        write_report(run_dir, cfg.loop.iterations)
    distributed.barrier()
    return run_dir


def final_student_adapter(run_dir: Path) -> Path:
    """The student adapter of the last finished imitate step (or the aligned one)."""
    state = RunState(run_dir)
    for step in reversed(state.done):
        if step.endswith("/imitate"):
            return run_dir / step.split("/")[0] / "student_adapter"
    if "align" in state:
        return run_dir / "align" / "student" / "adapter"
    raise FileNotFoundError(f"{run_dir}: no student adapter yet (no finished align or imitate)")


def export_student(run_dir: Path, out: Path) -> Path:
    """Merge the run's final student adapter into the base and save a plain checkpoint."""
    from mmdc.config import load_config
    from mmdc.stages.align import export_merged

    cfg = load_config(run_dir / "config.yaml")
    adapter = final_student_adapter(run_dir)
    loaded = _load(cfg.student, str(adapter))
    return export_merged(loaded.model, loaded.processor, out)
