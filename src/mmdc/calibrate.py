"""The distillation-calibration loop, end to end, resumable by step.

    baseline                  the student as given, on the held-out test (for the report)
    align                     stage 1: LoRA-align the student on the seed split
    iter_k/assess             teacher and student answer the probe split; the referee
                              marks hard / easy (a self-improving teacher also checks itself)
    iter_k/generate           the teacher writes, verifies and filters new instances
                              seeded from hard and easy probes; accepted ones join the pool
    iter_k/teacher_generate   (improve.enabled) the teacher writes and verifies instances
                              where its own letter and rationale disagree on a probe
    iter_k/teacher_update     (improve.enabled) the teacher learns its letters on every
                              instance it has labelled so far, replaying seed instances it
                              answers consistently
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

import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from mmdc import artifacts as A
from mmdc.config import Config, save_resolved
from mmdc.data.images import ImageCache, check_images
from mmdc.data.load import load_split_collective, read_image_pool
from mmdc.data.pool import ensure_dir
from mmdc.models.load import load_configured
from mmdc.report import write_report
from mmdc.runstate import (  # noqa: F401 - changed_keys is part of this module's API
    RunState,
    changed_keys,
    check_resumable,
    model_fingerprints,
)
from mmdc.steps import (
    Loop,
    restore_generate,
    restore_imitate,
    restore_teacher_generate,
    restore_teacher_update,
    step_align,
    step_assess,
    step_baseline,
    step_evaluate,
    step_generate,
    step_imitate,
    step_teacher_answers,
    step_teacher_generate,
    step_teacher_update,
)
from mmdc.toy.task import prepare_data

log = logging.getLogger(__name__)


def _always(cfg: Config) -> bool:
    return True


def _self_improving(cfg: Config) -> bool:
    return cfg.improve.enabled


class Step(NamedTuple):
    """One row of the iteration: its name, when it runs, the step, the restore that reads
    its artifacts back, and the contract: what it reads and writes in ``iter_<k>/`` (or,
    marked so, in earlier iterations and the data)."""

    name: str
    when: Callable[[Config], bool]
    run: Callable
    restore: Callable | None
    reads: tuple[str, ...]
    writes: tuple[str, ...]


# One iteration, in MmDC's order: assess the student, have the teacher write instances
# aimed at its weaknesses (and, when it self-improves, at its own), then the student
# learns.
ITERATION = (
    Step("assess", _always, step_assess, None,
         reads=("the probe split", "the current adapters"),
         writes=(A.TEACHER_PROBE_ANSWERS, A.STUDENT_PROBE_ANSWERS, A.ASSESSMENT,
                 A.ASSESSMENT_SUMMARY, A.TEACHER_SELF_ASSESSMENT + " (improve.enabled)")),
    Step("generate", _always, step_generate, restore_generate,
         reads=(A.ASSESSMENT, A.GENERATED_REJECTED + " of earlier iterations", "the pool"),
         writes=(A.GENERATED_ACCEPTED, A.GENERATED_REJECTED, A.GENERATION_REPORT)),
    Step("teacher_generate", _self_improving, step_teacher_generate, restore_teacher_generate,
         reads=(A.TEACHER_SELF_ASSESSMENT, "the pool"),
         writes=(A.TEACHER_GENERATED_ACCEPTED, A.TEACHER_GENERATED_REJECTED,
                 A.TEACHER_GENERATION_REPORT)),
    Step("teacher_update", _self_improving, step_teacher_update, restore_teacher_update,
         reads=(A.TEACHER_GENERATED_ACCEPTED + " of this and earlier iterations",
                "the seed split"),
         writes=(A.TEACHER_ADAPTER + "/", A.TEACHER_UPDATE)),
    Step("teacher_answers", _always, step_teacher_answers, None,
         reads=("the seed split", A.GENERATED_ACCEPTED + " of this and earlier iterations"),
         writes=(A.TEACHER_ANSWERS,)),
    Step("imitate", _always, step_imitate, restore_imitate,
         reads=(A.TEACHER_ANSWERS,),
         writes=(A.STUDENT_ADAPTER + "/", A.IMITATE)),
    Step("evaluate", _always, step_evaluate, None,
         reads=("the test split", "the current adapters"),
         writes=(A.METRICS, A.TEST_RESULTS)),
)


def _setup(cfg: Config) -> Loop:
    """Check what can be checked before any work, then load the data."""
    from mmdc import distributed
    from mmdc.config import check_loop_teacher
    from mmdc.stages.imitate import check_kd_compatible

    check_loop_teacher(cfg)
    if cfg.imitate.kd != "none":  # fail at start-up, not after hours of work
        check_kd_compatible(cfg.teacher.path, cfg.student.path)
    main = distributed.is_main()  # rank 0 writes the run folder; every rank computes
    run_dir = ensure_dir(cfg.run_dir, "run_dir")
    check_resumable(cfg, run_dir)  # the config and every model the finished steps used
    state = RunState(run_dir)
    state.check_models(model_fingerprints(cfg))
    # a finished step whose files were damaged since is redone in its place
    state.redo_damaged(distributed.broadcast(state.check_files() if main else None), main)
    if main:
        state.watch()
    if main:
        save_resolved(cfg, run_dir)
    prepare_data(cfg.data)
    seed_split = load_split_collective(cfg.data, cfg.data.seed_split)
    probe = load_split_collective(cfg.data, cfg.data.probe_split)
    test = load_split_collective(cfg.data, cfg.data.test_split)
    pool_images = ([r["image"] for r in read_image_pool(seed_split.root, cfg.data.pool)]
                   if cfg.data.pool else [])
    if cfg.loop.strategy != "none" and pool_images:  # a bad pool image: say so now
        check_images(seed_split.root, pool_images, str(seed_split.root / f"{cfg.data.pool}.jsonl"),
                     cfg.data.max_image_pixels)
    if cfg.loop.strategy != "none" and not pool_images and main:
        log.warning("no unlabelled image pool (data.pool): the teacher can only write "
                    "text-only instances; seeds with an image are skipped")
    if not state.done:  # sizes that cannot fit are refused before any work starts
        from mmdc.lengths import check_lengths

        check_lengths(cfg, seed_split, [probe, test])
    return Loop(cfg, run_dir, state, main, seed_split, probe, test, ImageCache(seed_split.root, cfg.data.max_image_pixels),
                pool_images, [i for i in seed_split.instances if i.answer is not None])


def _once(loop: Loop, name: str, step, *args) -> None:
    if name not in loop.state:
        loop.state.mark(name, step(loop, *args))


def run(cfg: Config) -> Path:
    """The whole run: baseline, alignment, then the iterations, each step skipped when the
    run folder has it; finally the report."""
    from mmdc import distributed

    loop = _setup(cfg)
    _once(loop, "baseline", step_baseline)
    if "student" in cfg.align.roles:  # stage 1 for the roles the config names
        _once(loop, "align", step_align, "student")
        loop.adapter = str(loop.run_dir / "align" / "student" / "adapter")
    if "teacher" in cfg.align.roles:
        _once(loop, "align/teacher", step_align, "teacher")
        loop.teacher_adapter = str(loop.run_dir / "align" / "teacher" / "adapter")
    for k in range(1, cfg.loop.iterations + 1):
        for row in ITERATION:
            if row.when(cfg):
                _once(loop, f"iter_{k}/{row.name}", row.run, k)
                if row.restore is not None:
                    row.restore(loop, k)
    if loop.main:
        write_report(loop.run_dir, cfg.loop.iterations)
    distributed.barrier()
    return loop.run_dir


def final_student_adapter(run_dir: Path) -> Path:
    """The student adapter of the last finished imitate step (or the aligned one)."""
    state = RunState(run_dir)
    for step in reversed(state.done):
        if step.endswith("/imitate"):
            return run_dir / step.split("/")[0] / A.STUDENT_ADAPTER
    if "align" in state:
        return run_dir / "align" / "student" / "adapter"
    raise FileNotFoundError(f"{run_dir}: no student adapter yet (no finished align or imitate)")


def export_student(run_dir: Path, out: Path) -> Path:
    """Merge the run's final student adapter into the base and save a plain checkpoint."""
    from mmdc.config import load_config
    from mmdc.training import export_merged

    cfg = load_config(run_dir / A.CONFIG)
    adapter = final_student_adapter(run_dir)
    loaded = load_configured(cfg.student, str(adapter))
    return export_merged(loaded.model, loaded.processor, out)
