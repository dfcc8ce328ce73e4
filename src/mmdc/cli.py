"""The ``mmdc`` command line.

    mmdc data synth --out DIR            write the built-in synthetic task (ScienceQA layout)
    mmdc data export [CONFIG] [k=v ...]  convert a configured split to LLaVA JSON or a pool
    mmdc eval [CONFIG] [k=v ...]         evaluate a model on a split (ScienceQA columns)
    mmdc align [CONFIG] [k=v ...]        stage 1: LoRA alignment (PEFT adapter folders)
    mmdc models build-toy                build the toy vision tower, teacher and student
    mmdc models info [PATH ...]          parameters and vocabulary sharing
    mmdc run [CONFIG] [k=v ...]          the whole pipeline; rerun into the same folder resumes
    mmdc calibrate [CONFIG] [k=v ...]    the calibration iterations (after align)
    mmdc report RUN_DIR                  rebuild a run's report.md from its files
    mmdc export RUN_DIR --out DIR        the final student, merged, as a plain HF checkpoint
    mmdc demo                            the built-in default, end to end (= mmdc run)

A problem with the user's input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from mmdc.errors import MmdcError

log = logging.getLogger("mmdc")


class _Formatter(logging.Formatter):
    """Progress lines plain (time and message); warnings and errors say what and where."""

    plain = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    full = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return (self.plain if record.levelno <= logging.INFO else self.full).format(record)


def setup_logging(verbose: bool = False) -> None:
    from mmdc import distributed

    level = logging.DEBUG if verbose else logging.INFO
    if not distributed.is_main():  # one process reports; the others speak only of trouble
        level = logging.WARNING
        os.environ.setdefault("TQDM_DISABLE", "1")
    import warnings

    # deprecation notices about the libraries' own internals are not the user's to act on
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars: one bar per stage is ours
    except ImportError:  # pragma: no cover
        pass


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: the built-in default)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="config overrides, e.g. eval.batch_size=16")


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


def _load_cfg(args):
    from mmdc.config import load_config

    config, overrides = _split_config_args(args)
    return load_config(config, overrides)


# ------------------------------------------------------------------------ commands


def cmd_data_synth(args) -> int:
    from mmdc.data.load import write_synthetic_task
    from mmdc.data.pool import ensure_dir
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
        scores, samples = evaluate_open_ended(cand, referee, rows, image_root)
        write_json(out_dir / f"{name}_openended.json", scores)
        write_jsonl(out_dir / f"{name}_openended_samples.jsonl", samples)
        print(f"{name}: relative score (judge: {args.judge})\n\n{format_relative(scores)}\n")
    print(f"results in {out_dir}")
    return 0


def cmd_eval(args) -> int:
    from mmdc import distributed
    from mmdc.config import save_resolved
    from mmdc.data.load import load_split_collective
    from mmdc.data.pool import ensure_dir
    from mmdc.evaluation import evaluate, format_columns, format_skills
    from mmdc.models.backends import load_backend

    cfg = _load_cfg(args)
    if args.questions:
        return cmd_eval_open_ended(args, cfg)
    split_name = args.split or cfg.data.test_split
    split = load_split_collective(cfg.data, split_name)
    split.load_images()
    out_dir = Path(args.out or Path(cfg.run_dir) / "eval")
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
    from mmdc.data.pool import ensure_dir, write_json
    from mmdc.stages.align import run_align

    cfg = _load_cfg(args)
    run_dir = Path(cfg.run_dir)
    if distributed.is_main():
        ensure_dir(run_dir, "run_dir")
        save_resolved(cfg, run_dir)
    for role in cfg.align.roles:
        out = run_dir / "align" / role
        summary = run_align(cfg, role, out)
        if distributed.is_main():
            write_json(out / "metrics.json", summary)
            print(f"aligned {role}: {summary['instances']} instances, {summary['steps']} "
                  f"steps, final loss {summary['losses'][-1]:.4f} -> {summary['adapter']}")
    distributed.barrier()
    return 0


def cmd_run(args) -> int:
    from mmdc import distributed
    from mmdc.calibrate import run

    cfg = _load_cfg(args)
    if getattr(args, "resume", False) and not (Path(cfg.run_dir) / "state.json").is_file():
        raise MmdcError(f"{cfg.run_dir}: nothing to resume (no state.json); run without --resume")
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

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MmdcError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    print(write_report(run_dir, cfg.loop.iterations).read_text(encoding="utf-8"))
    return 0


def cmd_export(args) -> int:
    from mmdc.calibrate import export_student

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MmdcError(f"{run_dir}: not a run folder (no config.yaml)")
    from mmdc.data.pool import ensure_dir

    ensure_dir(args.out, "--out")
    try:
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
          max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device)
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


# ------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdc", description="Multimodal distillation "
                                     "calibration (MmDC): distil a large multimodal LLM into "
                                     "a small one.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data.add_parser("synth", help="write the built-in synthetic task in the "
                            "official ScienceQA layout")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    for name, default in (("pretrain", 2000), ("train", 400), ("pool", 600), ("val", 200),
                          ("test", 400)):
        synth.add_argument(f"--{name}", type=int, default=default, help=f"size (default {default})")
    synth.set_defaults(func=cmd_data_synth)
    export = data.add_parser("export", help="write a configured split as LLaVA JSON or a "
                             "JSONL pool")
    _config_args(export)
    export.add_argument("--split", required=True)
    export.add_argument("--to", choices=["llava", "pool"], default="llava")
    export.add_argument("--prompt", choices=["CQM-A", "CQM-LEA"], default="CQM-LEA")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_data_export)

    ev = sub.add_parser("eval", help="evaluate models on a split: ScienceQA columns, "
                        "per-skill accuracy, LLaVA result file, lmms-eval samples")
    _config_args(ev)
    ev.add_argument("--model", action="append", default=None,
                    help="teacher, student or a model folder (repeatable; default: both)")
    ev.add_argument("--split", default=None, help="split to evaluate (default: data.test_split)")
    ev.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval)")
    ev.add_argument("--questions", default=None, help="open-ended questions JSONL "
                    "(LLaVA-Bench layout); scored by the judge instead of multiple choice")
    ev.add_argument("--references", default=None, help="reference answers JSONL")
    ev.add_argument("--images", default=None, help="image folder (default: the questions' folder)")
    ev.add_argument("--judge", default="teacher", help="judge model: teacher, student or a folder")
    ev.set_defaults(func=cmd_eval)

    align = sub.add_parser("align", help="stage 1: LoRA alignment of the configured roles "
                           "on the seed split (PEFT adapter + trained projector)")
    _config_args(align)
    align.set_defaults(func=cmd_align)

    run_p = sub.add_parser("run", help="the whole MmDC pipeline a config describes (align, "
                           "then imitate/assess/generate/evaluate per iteration); rerunning "
                           "into the same run folder resumes")
    _config_args(run_p)
    run_p.add_argument("--resume", action="store_true", help="continue the run in run_dir "
                       "(an error if there is none); rerunning without it resumes too")
    run_p.set_defaults(func=cmd_run)
    calib = sub.add_parser("calibrate", help="the calibration iterations (imitate, assess, "
                           "generate, evaluate) in run_dir, after the align step (which runs "
                           "first if it has not)")
    _config_args(calib)
    calib.add_argument("--resume", action="store_true", help="as for run")
    calib.set_defaults(func=cmd_run)
    report = sub.add_parser("report", help="rebuild report.md of a run folder from its files")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    export = sub.add_parser("export", help="merge a run's final student adapter into the base "
                            "model and save a plain save_pretrained checkpoint")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export)

    models = sub.add_parser("models", help="model tools").add_subparsers(
        dest="models_command", required=True, metavar="SUBCOMMAND")
    build = models.add_parser("build-toy", help="build the toy vision tower, teacher and "
                              "student (cached: reused unless --force)")
    build.add_argument("--out", default=None, help="folder (default: the package's "
                       "toy/checkpoints)")
    build.add_argument("--force", action="store_true", help="rebuild even if built")
    build.set_defaults(func=cmd_models_build)
    info = models.add_parser("info", help="parameter counts and vocabulary sharing")
    info.add_argument("paths", nargs="*", help="model folders or builtin:NAME "
                      "(default: the toy teacher and student)")
    info.set_defaults(func=cmd_models_info)

    srv = sub.add_parser("serve", help="an OpenAI-compatible chat-completions server for a "
                         "checkpoint (e.g. the exported student, or a teacher for "
                         "teacher.backend=openai)")
    srv.add_argument("checkpoint", help="a save_pretrained folder or builtin:NAME")
    srv.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply")
    srv.add_argument("--name", default=None, help="the model id clients send "
                     "(default: the checkpoint argument)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--token-env", default=None, metavar="VAR", help="require "
                     "'Authorization: Bearer $VAR' (the token is read from this variable)")
    srv.add_argument("--max-request-mb", type=float, default=8.0, help="413 above this")
    srv.add_argument("--max-images", type=int, default=1, help="images per request")
    srv.add_argument("--max-batch", type=int, default=16, help="concurrent requests "
                     "generated together")
    srv.add_argument("--max-new-tokens", type=int, default=1024, help="the largest max_tokens "
                     "a request may ask")
    srv.add_argument("--dtype", default="float32",
                     choices=["float32", "bfloat16", "float16", "auto"])
    srv.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    srv.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run the built-in default end to end on CPU")
    _config_args(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere on the line, after options too
    args, extras = parser.parse_known_args(argv)
    stray = [a for a in extras if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = list(args.overrides) + extras
    setup_logging(args.verbose)
    if getattr(args, "command", None) == "eval" and args.model is None:
        args.model = ["teacher", "student"]
    terminated = []

    def on_sigterm(signum, frame):  # unwind like Ctrl-C, so every cleanup runs
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = _install_sigterm(on_sigterm)
    try:
        _check_processes(args)
        return args.func(args)
    except MmdcError as exc:
        print(f"mmdc: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave that cannot be read or written
        if args.verbose or not exc.filename:
            raise
        print(f"mmdc: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        what = "terminated" if terminated else "interrupted"
        print(f"mmdc: {what}; finished steps are kept, the same command resumes a run",
              file=sys.stderr)
        return 143 if terminated else 130
    finally:
        _install_sigterm(previous)


# Commands that run as several processes (torchrun / accelerate launch): training is
# data-parallel, generation and evaluation are shared out over the ranks, rank 0 writes.
MULTI_PROCESS_COMMANDS = ("align", "run", "calibrate", "eval")


def _check_processes(args) -> None:
    from mmdc import distributed

    if distributed.world_size() == 1:
        return
    if args.command not in MULTI_PROCESS_COMMANDS:
        raise MmdcError(f"mmdc {args.command} runs in one process; of the commands only "
                        f"{', '.join(MULTI_PROCESS_COMMANDS)} runs under torchrun/accelerate "
                        f"launch so far (got WORLD_SIZE={distributed.world_size()})")
    distributed.init()


def _install_sigterm(handler):
    """Set the SIGTERM handler (main thread only); returns the previous one."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
