"""Fault injection for the kill-and-resume tests: ``MMDC_FAILPOINT=NAME`` makes the
process SIGKILL itself (no cleanup at all, as a crash or an OOM killer would) when it
reaches the point named NAME. Points: ``STEP@N`` after batch N of a checkpointed
generation or training step N (e.g. ``iter_1/teacher_answers:teacher@2``,
``iter_1/imitate@3``) and ``after:STEP`` once a step is recorded as finished.
``MMDC_FAILPOINT_SIGNAL=SIGTERM`` sends that signal instead (a clean stop, as a job
scheduler asks for one), at exactly that point rather than whenever a test's poll sees it.
Unset, this does nothing."""

from __future__ import annotations

import os
import signal

ENV = "MMDC_FAILPOINT"
SIGNAL_ENV = "MMDC_FAILPOINT_SIGNAL"


def maybe_fail(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), getattr(signal, os.environ.get(SIGNAL_ENV, "SIGKILL")))
