"""The calibration-gain benchmark, run end to end at tiny size: every arm, its tables."""

import subprocess
import sys
from pathlib import Path

from .conftest import small_data_overrides
from .test_run import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_calibration_gain_runs_every_arm_and_prints_its_tables(tmp_path):
    overrides = [*small_data_overrides(tmp_path / "data"), *TINY,
                 "loop.teacher_train.max_steps=2", "loop.teacher_train.batch_size=4"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "calibration_gain.py"), "--seeds", "0",
         "--out", str(tmp_path / "out"), *overrides],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for arm in ("targeted", "random", "none", "self-improve"):
        assert f"| {arm} | 1 |" in out
    assert "| (before calibration) | 0 |" in out
    assert "Where the gain comes from" in out and "| count_color |" in out
    assert "targeted - none (last iteration)" in out
    assert "Self-improving teacher, per skill" in out and "| CQM-LEA | iter 1 |" in out
    assert "Its weakest skill" in out
    assert (tmp_path / "out" / "calibration_gain.json").is_file()
