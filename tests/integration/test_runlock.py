"""A run folder has one owner: a second command that would write into it is refused at
once, touching nothing, and the first finishes whole; a holder that died leaves no hold.

The first run stops itself (SIGSTOP) at a fail point while it holds the folder, and the
test waits for that stop, an event, not a clock."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmdc.cli import main
from mmdc.runlock import LOCK_NAME, acquire, release
from tests.conftest import TINY, small_data_overrides


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _start(run_dir: Path, args: list[str], point: str, how: str, log: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MMDC_FAILPOINT=point,
               MMDC_FAILPOINT_SIGNAL=how)
    with log.open("w") as out:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen([sys.executable, "-m", "mmdc", "run", f"run_dir={run_dir}",
                                 *args], env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture()
def args(tmp_path):
    return [*small_data_overrides(tmp_path / "data"), *TINY]


def test_a_second_command_is_refused_while_the_first_holds_the_folder(tmp_path, args,
                                                                       capsys):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    first = _start(run_dir, args, "after:align", "SIGSTOP", log)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # until it stops itself
        assert os.WIFSTOPPED(status), log.read_text()[-2000:]
        before = _files(run_dir)
        holder = json.loads(before[LOCK_NAME])
        assert holder["pid"] == first.pid and holder["command"] == "mmdc run"
        for cmd in (["run", f"run_dir={run_dir}", *args],
                    ["run", f"run_dir={run_dir}", *args, "--resume"],
                    ["calibrate", f"run_dir={run_dir}", *args],
                    ["align", f"run_dir={run_dir}", *args],
                    ["report", str(run_dir)],
                    ["eval", f"run_dir={run_dir}", *args, "--model", "builtin:student"],
                    ["export", str(run_dir), "--out", str(run_dir / "student")]):
            assert main(cmd) == 2, cmd
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("mmdc: error:"), (cmd, err)
            assert str(run_dir) in err[0] and f"pid {first.pid}" in err[0], err[0]
            assert "'mmdc run'" in err[0], err[0]
        assert _files(run_dir) == before  # nothing of the first touched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait() == 0, log.read_text()[-2000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"][-1] == "iter_1/evaluate" and (run_dir / "report.md").is_file()
    assert not (run_dir / LOCK_NAME).exists()  # let go when it ended


def test_a_holder_that_died_does_not_block_resume(tmp_path, args, capsys):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    first = _start(run_dir, args, "after:align", "SIGKILL", log)
    assert first.wait() == -signal.SIGKILL, log.read_text()[-2000:]
    stale = json.loads((run_dir / LOCK_NAME).read_text())
    assert stale["pid"] == first.pid  # its note is left behind, its hold is not
    assert main(["run", f"run_dir={run_dir}", *args, "--resume"]) == 0
    assert "iter_1/evaluate" in json.loads((run_dir / "state.json").read_text())["done"]
    assert not (run_dir / LOCK_NAME).exists()


def test_a_hold_is_exclusive_and_let_go(tmp_path):
    fd = acquire(tmp_path, "mmdc run")
    try:
        with pytest.raises(Exception, match="in use by 'mmdc run'"):
            acquire(tmp_path, "mmdc report")
    finally:
        release(tmp_path, fd)
    assert not (tmp_path / LOCK_NAME).exists()
    release(tmp_path, acquire(tmp_path, "mmdc report"))  # free again
