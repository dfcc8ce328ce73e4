"""What each ``mmdc`` command does: one ``cmd_*`` function per (sub)command, called by
:func:`mmdc.cli.main` with the parsed arguments. Each returns the exit code; a problem
with the user's input raises :class:`~mmdc.errors.MmdcError`, which the entry point turns
into one line on stderr.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmdc import artifacts
from mmdc.errors import MmdcError


def _split_config_args(args) -> tuple[str | None, list[str]]:
    """The config file and the ``key=value`` overrides, wherever they stood on the line:
    a positional with ``=`` that is not an existing file is an override, any other is the
    config file (at most one)."""
    items = ([args.config] if args.config is not None else []) + list(args.overrides)
    configs = [a for a in items if "=" not in a or Path(a).exists()]
    overrides = [a for a in items if a not in configs]
    if len(configs) > 1:
        raise MmdcError(f"more than one config file given ({', '.join(configs)}); config "
                        "overrides are key=value, e.g. eval.batch_size=16")
    return (configs[0] if configs else None), overrides


def _inside(path, run_dir) -> bool:
    return Path(path).resolve().is_relative_to(Path(run_dir).resolve())


def _owning(run_dir, args, writes: bool = True):
    """Hold ``run_dir`` for this command while it writes there (see :mod:`mmdc.runlock`);
    a command that writes elsewhere holds nothing."""
    from contextlib import nullcontext

    from mmdc.runlock import hold

    return hold(run_dir, f"mmdc {args.command}") if writes else nullcontext()


def _load_cfg(args):
    from mmdc.config import load_config
    from mmdc.toy.task import prepare_data

    config, overrides = _split_config_args(args)
    cfg = load_config(config, overrides)
    prepare_data(cfg.data)  # the built-in synthetic task, written once into data.root
    return cfg


def cmd_data_synth(args) -> int:
    from mmdc.data.pool import ensure_dir
    from mmdc.toy.task import write_synthetic_task
    from mmdc.toy.world import TaskSizes

    ensure_dir(args.out, "--out")
    sizes = TaskSizes(pretrain=args.pretrain, train=args.train, pool=args.pool, val=args.val,
                      test=args.test)
    out = write_synthetic_task(args.out, sizes, args.seed)
    print(f"wrote the synthetic task (seed {args.seed}) to {out}: "
          f"pretrain {sizes.pretrain}, train {sizes.train}, val {sizes.val}, "
          f"test {sizes.test}, pool {sizes.pool} images")
    return 0


def cmd_data_export(args) -> int:
    from mmdc.data.llava import write_llava_json
    from mmdc.data.load import load_split
    from mmdc.data.pool import write_pool

    cfg = _load_cfg(args)
    split = load_split(cfg.data, args.split)
    labelled = [i for i in split.instances if i.answer is not None]
    if args.to == "llava":
        out = write_llava_json(args.out, labelled, args.prompt)
    else:
        out = write_pool(args.out, split.instances)
    print(f"wrote {len(labelled if args.to == 'llava' else split.instances)} records "
          f"of split {args.split!r} to {out}")
    return 0


def _model_cfg(cfg, which: str):
    from mmdc.config import ModelConfig

    if which in ("teacher", "student"):
        return which, getattr(cfg, which)
    name = Path(which).name or "model"
    return name, ModelConfig(path=which)


def cmd_eval_open_ended(args, cfg) -> int:
    from mmdc.data.pool import write_json, write_jsonl
    from mmdc.models.backends import load_backend
    from mmdc.openended import evaluate_open_ended, format_relative, read_bench
    from mmdc.stages.assess import JudgeReferee

    if not args.references:
        raise MmdcError("--questions needs --references (the reference answers JSONL)")
    rows = read_bench(args.questions, args.references)
    _, jcfg = _model_cfg(cfg, args.judge)
    judge = load_backend(jcfg)
    referee = JudgeReferee(judge, max_new_tokens=cfg.eval.max_new_tokens)
    out_dir = Path(args.out or Path(cfg.run_dir) / "eval")
    image_root = Path(args.images or Path(args.questions).parent)
    for which in args.model:
        name, mcfg = _model_cfg(cfg, which)
        cand = load_backend(mcfg)
        scores, samples = evaluate_open_ended(cand, referee, rows, image_root,
                                              max_pixels=cfg.data.max_image_pixels)
        write_json(out_dir / f"{name}_openended.json", scores)
        write_jsonl(out_dir / f"{name}_openended_samples.jsonl", samples)
        print(f"{name}: relative score (judge: {args.judge})\n\n{format_relative(scores)}\n")
    print(f"results in {out_dir}")
    return 0


def cmd_eval(args) -> int:
    cfg = _load_cfg(args)
    out_dir = Path(args.out or Path(cfg.run_dir) / "eval")
    with _owning(cfg.run_dir, args, _inside(out_dir, cfg.run_dir)):
        if args.questions:
            return cmd_eval_open_ended(args, cfg)
        return _evaluate(args, cfg, out_dir)


def _evaluate(args, cfg, out_dir: Path) -> int:
    from mmdc import distributed
    from mmdc.config import save_resolved
    from mmdc.data.load import load_split_collective
    from mmdc.data.pool import ensure_dir
    from mmdc.evaluation import evaluate, format_columns, format_skills
    from mmdc.models.backends import load_backend

    split_name = args.split or cfg.data.test_split
    split = load_split_collective(cfg.data, split_name)
    split.load_images()
    main = distributed.is_main()
    if main:
        ensure_dir(out_dir, "--out" if args.out else "run_dir")
        save_resolved(cfg, out_dir)
    columns, skills = {}, {}
    for which in args.model:
        name, mcfg = _model_cfg(cfg, which)
        # a served teacher (backend openai) evaluates too; in-process models share the
        # split out over the ranks when launched as several processes
        generator = distributed.Sharded(load_backend(mcfg))
        result = evaluate(generator, split, fmt=cfg.eval.prompt,
                          batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                          limit=cfg.eval.limit, desc=f"eval {name}")
        if main:
            result.save(out_dir, f"{name}_{split_name}")
        columns[name], skills[name] = result.columns, result.skills
    text = (f"ScienceQA columns on split {split_name!r} ({cfg.eval.prompt}):\n\n"
            f"{format_columns(columns)}\n\nAccuracy per skill:\n\n{format_skills(skills)}\n")
    if main:
        (out_dir / f"eval_{split_name}.md").write_text(text, encoding="utf-8")
        print(text)
        print(f"results in {out_dir}")
    distributed.barrier()
    return 0


def cmd_models_build(args) -> int:
    from mmdc.models.load import TOY_DIR
    from mmdc.toy.build import build_toy

    out = Path(args.out) if args.out else TOY_DIR
    start = time.time()
    result = build_toy(out, force=args.force)
    for role, m in result.items():
        print(f"{role}: {m['parameters']:,} parameters, built in {m['build_seconds']}s "
              f"-> {out / role}")
    print(f"done in {time.time() - start:.0f}s")
    return 0


def cmd_models_info(args) -> int:
    from mmdc.models.load import count_parameters, load_model, vocab_report

    paths = args.paths or ["builtin:teacher", "builtin:student"]
    for p in paths:
        loaded = load_model(p, device="cpu")
        print(f"{p}: {type(loaded.model).__name__}, {count_parameters(loaded.model):,} "
              f"parameters, vocabulary {len(loaded.tokenizer)}")
    if len(paths) == 2:
        rep = vocab_report(paths[0], paths[1])
        shared = "yes" if rep["shared_vocabulary"] else "no"
        print(f"shared vocabulary (token-level distillation possible): {shared}")
        print(json.dumps(rep))
    return 0


def cmd_align(args) -> int:
    from mmdc import distributed
    from mmdc.config import save_resolved

    cfg = _load_cfg(args)
    run_dir = Path(cfg.run_dir)
    with _owning(run_dir, args):
        if distributed.is_main():
            save_resolved(cfg, run_dir)
        _align_roles(cfg, run_dir)
    return 0


def _align_roles(cfg, run_dir: Path) -> None:
    from mmdc import distributed
    from mmdc.data.pool import write_json
    from mmdc.stages.align import run_align

    for role in cfg.align.roles:
        out = run_dir / "align" / role
        summary = run_align(cfg, role, out)
        if distributed.is_main():
            write_json(out / artifacts.METRICS, summary)
            print(f"aligned {role}: {summary['instances']} instances, {summary['steps']} "
                  f"steps, final loss {summary['losses'][-1]:.4f} -> {summary['adapter']}")
    distributed.barrier()


def cmd_run(args) -> int:
    from mmdc import distributed
    from mmdc.calibrate import run

    cfg = _load_cfg(args)
    if getattr(args, "resume", False) and not (Path(cfg.run_dir) / artifacts.STATE).is_file():
        raise MmdcError(f"{cfg.run_dir}: nothing to resume (no state.json); run without --resume")
    with _owning(cfg.run_dir, args):
        run_dir = run(cfg)
    if distributed.is_main():
        from mmdc.report import narrative_text

        print(narrative_text(run_dir))
        print(f"report: {run_dir / 'report.md'} (tables, diagnostics, plots)")
        print(f"run folder: {run_dir}")
    return 0


def cmd_report(args) -> int:
    from mmdc.config import load_config
    from mmdc.report import write_report
    from mmdc.runstate import RunState

    run_dir = Path(args.run_dir)
    if not (run_dir / artifacts.CONFIG).is_file():
        raise MmdcError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / artifacts.CONFIG)
    with _owning(run_dir, args):
        damaged = RunState(run_dir).check_files()
        if damaged:
            step, what = next(iter(damaged.items()))
            raise MmdcError(f"{what[0]}: damaged since {step} wrote it; rerun the run on this "
                            f"folder (mmdc run, the same config) to redo {step}, then report")
        report = write_report(run_dir, cfg.loop.iterations)
    print(report.read_text(encoding="utf-8"))
    return 0


def cmd_export(args) -> int:
    from mmdc.calibrate import export_student

    run_dir = Path(args.run_dir)
    if not (run_dir / artifacts.CONFIG).is_file():
        raise MmdcError(f"{run_dir}: not a run folder (no config.yaml)")
    from mmdc.data.pool import ensure_dir

    ensure_dir(args.out, "--out")
    try:
        with _owning(run_dir, args, _inside(args.out, run_dir)):
            out = export_student(run_dir, Path(args.out))
    except FileNotFoundError as exc:
        raise MmdcError(str(exc)) from None
    print(f"exported the merged student to {out} (loads with AutoModelForImageTextToText)")
    return 0


def cmd_serve(args) -> int:
    from mmdc.config import secret_from_env
    from mmdc.serve import serve

    token = secret_from_env(args.token_env, "--token-env") if args.token_env else None
    serve(args.checkpoint, adapter=args.adapter, name=args.name, host=args.host,
          port=args.port, token=token, max_bytes=int(args.max_request_mb * 1024 * 1024),
          max_images=args.max_images, max_batch=args.max_batch,
          max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
          max_pixels=args.max_image_pixels)
    return 0


def cmd_demo(args) -> int:
    """The built-in default end to end: the synthetic task, the toy teacher and student,
    alignment and the calibration loop, evaluated and reported per iteration."""
    from mmdc.models.load import vocab_report

    cfg = _load_cfg(args)
    rep = vocab_report(cfg.teacher.path, cfg.student.path)
    print(f"teacher and student share a vocabulary: {'yes' if rep['shared_vocabulary'] else 'no'}"
          f" ({rep['teacher_vocab_size']} / {rep['student_vocab_size']} tokens)")
    return cmd_run(args)
