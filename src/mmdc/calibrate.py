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
import json
import logging
import random
import time
from pathlib import Path

from mmdc.config import Config, save_resolved
from mmdc.data.images import ImageCache
from mmdc.data.load import load_split_collective, read_image_pool
from mmdc.data.pool import (
    read_jsonl,
    read_pool,
    write_json,
    write_jsonl,
    write_pool,
)
from mmdc.data.record import Instance
from mmdc.errors import ConfigError
from mmdc.evaluation import evaluate
from mmdc.models.load import load_configured
from mmdc.report import write_report

log = logging.getLogger(__name__)


class RunState:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "state.json"
        self.done: list[str] = []
        if self.path.is_file():
            self.done = json.loads(self.path.read_text())["done"]
        self.clock = time.monotonic()

    def __contains__(self, step: str) -> bool:
        return step in self.done

    def mark(self, step: str, summary: str = "") -> None:
        """Record a finished step and say in one line what it did. Under several processes
        rank 0 writes the file and every rank waits here, so what rank 0 wrote for the step
        is there for all to read. The step's generation journal is no longer needed once
        its results are written."""
        from mmdc import distributed
        from mmdc.faults import maybe_fail

        self.done.append(step)
        if distributed.is_main():
            write_json(self.path, {"done": self.done, "last": step})
            took = time.monotonic() - self.clock
            log.info("%s done%s (%.0f s)", step, f": {summary}" if summary else "", took)
            journal = journal_path(self.path.parent, step)
            journal.unlink(missing_ok=True)
            if journal.parent.is_dir() and not any(journal.parent.iterdir()):
                journal.parent.rmdir()
        distributed.barrier()
        self.clock = time.monotonic()
        maybe_fail(f"after:{step}")


def journal_path(run_dir: Path, step: str) -> Path:
    """Where a step checkpoints its in-process generation, batch by batch."""
    return run_dir / "cache" / (step.replace("/", "-") + ".journal.jsonl")


def _journaled(generator, run_dir: Path, step: str, who: str):
    from mmdc.models.backends import Journaled

    return Journaled(generator, journal_path(run_dir, step), f"{step}:{who}")


# Keys that no finished step depends on: a resume may change them (add iterations, say;
# or point at the teacher's server where it now runs).
RESUME_SAFE_KEYS = ("run_dir", "loop.iterations", "eval.batch_size", "teacher.endpoint",
                    "teacher.api_key_env", "teacher.concurrency", "teacher.timeout",
                    "teacher.max_retries")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def changed_keys(old: dict, new: Config) -> list[str]:
    """Dotted config keys whose value differs between a saved config and ``new``; a key
    the saved config lacks (written by an older mmdc) counts at its default."""
    before = _flatten(Config().model_dump(mode="json"))
    before.update(_flatten(old))
    after = _flatten(new.model_dump(mode="json"))
    return sorted(k for k in before.keys() | after.keys()
                  if before.get(k) != after.get(k)
                  and not any(k == s or k.startswith(s + ".") for s in RESUME_SAFE_KEYS))


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run folder whose finished steps ran with another config."""
    import yaml

    saved = run_dir / "config.yaml"
    if not RunState(run_dir).done or not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{saved}: unreadable ({exc}); cannot check it before resuming") from None
    changed = changed_keys(old, cfg)
    if changed:
        raise ConfigError(
            f"{run_dir}: the config differs from the one its finished steps ran with "
            f"({', '.join(changed)}); use a new run_dir, or set these back to resume")


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
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(cfg, run_dir)
    if main:
        save_resolved(cfg, run_dir)
    state = RunState(run_dir)
    seed_split = load_split_collective(cfg.data, cfg.data.seed_split)
    probe = load_split_collective(cfg.data, cfg.data.probe_split)
    test = load_split_collective(cfg.data, cfg.data.test_split)
    images = ImageCache(seed_split.root)
    pool_images = ([r["image"] for r in read_image_pool(seed_split.root, cfg.data.pool)]
                   if cfg.data.pool else [])
    if cfg.loop.strategy != "none" and not pool_images and main:
        log.warning("no unlabelled image pool (data.pool): the teacher can only write "
                    "text-only instances; seeds with an image are skipped")
    labelled = [i for i in seed_split.instances if i.answer is not None]
    tb = run_dir / "tensorboard"

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
                    seed=cfg.seed + k, max_accepted=g.max_accepted)
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
                                     cfg.loop.teacher_train, label=f"iter_{k}/teacher_update")
                if main:
                    write_json(it / "teacher_update.json", {"trained_on": len(rows), "losses": losses})
                state.mark(f"iter_{k}/teacher_update", f"the teacher learned {len(rows)} "
                           "verified instances, " + _loss_words(losses))
            teacher_adapter = str(it / "teacher_adapter")
        pool = labelled + generated  # the seed split and every accepted instance so far
        # -- the teacher answers the instruction pool (CQM-LEA)
        if f"iter_{k}/teacher_answers" not in state:
            teacher = _journaled(_teacher(cfg, teacher_adapter, run_dir), run_dir,
                                 f"iter_{k}/teacher_answers", "teacher")

            def answer_all(t=teacher, items=pool, k=k):
                return answer_pool(t, items, [images(i.image) for i in items],
                                   max_new_tokens=cfg.imitate.max_new_tokens,
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
                                 label=f"iter_{k}/imitate", **kd)
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
