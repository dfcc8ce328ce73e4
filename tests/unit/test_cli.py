"""The command line: ``calibrate`` is another name for ``run``, whose help names the
loop's steps in the order they run."""

import argparse

from mmdc import calibrate, commands
from mmdc.cli import build_parser


def _help_of(name: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a.help for a in sub._choices_actions if a.dest == name)


def test_calibrate_is_run():
    parser = build_parser()
    for name in ("run", "calibrate"):
        args = parser.parse_args([name, "loop.iterations=1", "--resume"])
        assert args.func is commands.cmd_run and args.resume


def test_run_help_names_the_steps_in_their_order():
    text = " ".join(_help_of("run").split())
    names = ["baseline", "align"] + [row[0] for row in calibrate.ITERATION]
    places = [text.index(f" {n}") for n in names]
    assert places == sorted(places)
