"""The calibration-gain benchmark, run end to end at tiny size: every arm, its tables."""

import subprocess
import sys

from tests.conftest import ROOT, TINY, small_data_overrides


def test_calibration_gain_runs_every_arm_and_prints_its_tables(tmp_path):
    """Two runs at a time (--jobs 2): the task is written once, before the runs."""
    overrides = [*small_data_overrides(tmp_path / "data"),  # every arm sets self_improve
                 *(a for a in TINY if not a.startswith("improve.enabled")),
                 "improve.train.max_steps=2", "improve.train.batch_size=4"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "calibration_gain.py"), "--seeds", "0",
         "--out", str(tmp_path / "out"), "--jobs", "2", *overrides],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for arm in ("self-improve", "fixed-teacher", "random", "none"):
        assert f"| {arm} | 1 |" in out
    assert "| (before calibration) | 0 |" in out
    assert "Where the gain comes from" in out and "| count_color |" in out
    for other in ("fixed-teacher", "random", "none"):
        assert f"self-improve - {other} (last iteration)" in out
    assert "- original teacher:" in out
    assert "Self-improving teacher, per skill" in out and "| CQM-A | iter 1 |" in out
    assert "| CQM-LEA | as given |" in out and "Precision of its self-made labels" in out
    assert (tmp_path / "out" / "calibration_gain.json").is_file()


def test_real_scale_runs_tiny_on_cpu(tmp_path):
    """benchmarks/real_scale.py --tiny: every shape, both caches, generation and LoRA
    training through the project's code, each figure beside its bound."""
    import json

    out = tmp_path / "real_scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_scale.py"), "--tiny", "--batches", "1",
         "3", "--new-tokens", "4", "--train-steps", "4", "--train-batch", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["shapes"]) == {"llava-1.5-7b", "llava-1.5-13b", "llava-next-7b"}
    for r in results["shapes"].values():
        assert {(g["cache"], g["batch"]) for g in r["generation"]} == {
            (c, b) for c in ("dynamic", "static") for b in (1, 3)}
        assert all(g["tokens_per_s"] > 0 and 0 < g["ratio"] for g in r["generation"])
        assert r["training"]["tokens_per_s"] > 0 and 0 < r["training"]["mfu"]
    assert "| llava-next-7b |" in proc.stdout and "| of bound |" in proc.stdout


def test_imitation_ceiling_trains_on_oracle_instances_and_prints_per_skill(tmp_path):
    """docs/experiments/probes/imitation_ceiling.py: one imitation step per N, oracle labels, a row
    per N with every skill of the test split."""
    overrides = [*small_data_overrides(tmp_path / "data"), "imitate.train.max_steps=2",
                 "imitate.train.batch_size=4"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs/experiments/probes/imitation_ceiling.py"), "--skill",
         "spatial", "--n", "0", "5", "--weight", "1", "2", *overrides],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| 0 |") or
            ln.startswith("| 5 |")]
    assert len(rows) == 2
    # 24 seed rows; plus 5 new spatial instances twice
    assert rows[0].startswith("| 0 | 1 | 24 |") and rows[1].startswith("| 5 | 2 | 34 |")
    assert "| N | repeats | rows |" in proc.stdout and " spatial |" in proc.stdout
