"""The ``mmdc`` command line.

    mmdc data synth --out DIR            write the built-in synthetic task (ScienceQA layout)
    mmdc data export [CONFIG] [k=v ...]  convert a configured split to LLaVA JSON or a pool
    mmdc eval [CONFIG] [k=v ...]         evaluate a model on a split (ScienceQA columns)
    mmdc align [CONFIG] [k=v ...]        stage 1: LoRA alignment (PEFT adapter folders)
    mmdc models build-toy                build the toy vision tower, teacher and student
    mmdc models info [PATH ...]          parameters and vocabulary sharing
    mmdc run [CONFIG] [k=v ...]          the whole pipeline; rerun into the same folder resumes
    mmdc calibrate [CONFIG] [k=v ...]    another name for mmdc run
    mmdc report RUN_DIR                  rebuild a run's report.md from its files
    mmdc export RUN_DIR --out DIR        the final student, merged, as a plain HF checkpoint
    mmdc demo                            the built-in default, end to end (= mmdc run)

A problem with the user's input is one line on stderr and exit code 2. The commands
themselves are in :mod:`mmdc.commands`; this module parses the line and runs one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mmdc import commands
from mmdc.data.images import MAX_IMAGE_PIXELS
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
    # absl: rouge_score says "Using default tokenizer." each time a scorer is made;
    # matplotlib: "generated new fontManager" the first time it plots on a machine
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "absl",
                  "matplotlib"):
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
    synth.set_defaults(func=commands.cmd_data_synth)
    export = data.add_parser("export", help="write a configured split as LLaVA JSON or a "
                             "JSONL pool")
    _config_args(export)
    export.add_argument("--split", required=True)
    export.add_argument("--to", choices=["llava", "pool"], default="llava")
    export.add_argument("--prompt", choices=["CQM-A", "CQM-LEA"], default="CQM-LEA")
    export.add_argument("--out", required=True)
    export.set_defaults(func=commands.cmd_data_export)

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
    ev.set_defaults(func=commands.cmd_eval)

    align = sub.add_parser("align", help="stage 1: LoRA alignment of the configured roles "
                           "on the seed split (PEFT adapter + trained projector)")
    _config_args(align)
    align.set_defaults(func=commands.cmd_align)

    run_p = sub.add_parser(
        "run", aliases=["calibrate"],
        help="the whole MmDC pipeline a config describes, in this order: baseline (the "
             "student as given), align (stage 1, LoRA), then per iteration assess, generate, "
             "teacher_generate and teacher_update (the self-improving teacher, "
             "improve.enabled), teacher_answers, imitate, evaluate; rerunning into the "
             "same run folder resumes (calibrate is another name for it)")
    _config_args(run_p)
    run_p.add_argument("--resume", action="store_true", help="continue the run in run_dir "
                       "(an error if there is none); rerunning without it resumes too")
    run_p.set_defaults(func=commands.cmd_run)
    report = sub.add_parser("report", help="rebuild report.md of a run folder from its files")
    report.add_argument("run_dir")
    report.set_defaults(func=commands.cmd_report)

    export = sub.add_parser("export", help="merge a run's final student adapter into the base "
                            "model and save a plain save_pretrained checkpoint")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.set_defaults(func=commands.cmd_export)

    models = sub.add_parser("models", help="model tools").add_subparsers(
        dest="models_command", required=True, metavar="SUBCOMMAND")
    build = models.add_parser("build-toy", help="build the toy vision tower, teacher and "
                              "student (cached: reused unless --force)")
    build.add_argument("--out", default=None, help="folder (default: the package's "
                       "toy/checkpoints)")
    build.add_argument("--force", action="store_true", help="rebuild even if built")
    build.set_defaults(func=commands.cmd_models_build)
    info = models.add_parser("info", help="parameter counts and vocabulary sharing")
    info.add_argument("paths", nargs="*", help="model folders or builtin:NAME "
                      "(default: the toy teacher and student)")
    info.set_defaults(func=commands.cmd_models_info)

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
    srv.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                     help="400 for an image with more pixels, refused by its header "
                     f"(default {MAX_IMAGE_PIXELS:,}; the config's data.max_image_pixels)")
    srv.add_argument("--max-batch", type=int, default=16, help="concurrent requests "
                     "generated together")
    srv.add_argument("--max-new-tokens", type=int, default=1024, help="the largest max_tokens "
                     "a request may ask")
    srv.add_argument("--dtype", default="float32",
                     choices=["float32", "bfloat16", "float16", "auto"])
    srv.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    srv.set_defaults(func=commands.cmd_serve)

    demo = sub.add_parser("demo", help="run the built-in default end to end on CPU")
    _config_args(demo)
    demo.set_defaults(func=commands.cmd_demo)
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
