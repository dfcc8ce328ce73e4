"""The built-in default as a user runs it (``make test-slow``), and one calibration
iteration on a CUDA GPU (skipped without one)."""

import json

import pytest

from mmdc.cli import main


@pytest.mark.slow
def test_the_demo_tells_the_story(tmp_path, capsys):
    """``mmdc demo`` on the built-in default, whole: the teacher checks and improves itself,
    the student is calibrated, and the report says where it ends against the original
    teacher, with the plot from iteration 0."""
    run_dir = tmp_path / "run"
    assert main(["demo", f"run_dir={run_dir}", f"data.root={tmp_path / 'data'}"]) == 0
    out = capsys.readouterr().out
    assert "found itself unreliable" in out and "In the end the student scores" in out
    done = json.loads((run_dir / "state.json").read_text())["done"]
    for k in (1, 2, 3):
        assert f"iter_{k}/teacher_update" in done and f"iter_{k}/evaluate" in done
    base = json.loads((run_dir / "baseline" / "metrics.json").read_text())
    assert {"student", "teacher", "teacher_rationales"} <= set(base)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["diagnostics"]["1"]["teacher_self"]["labels"]["n"] > 0
    assert (run_dir / "accuracy.png").is_file()


@pytest.mark.gpu
def test_one_iteration_on_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    run_dir = tmp_path / "run"
    assert main(["run", f"run_dir={run_dir}", f"data.root={tmp_path / 'data'}",
                 "loop.iterations=1", "teacher.dtype=bfloat16", "student.dtype=bfloat16",
                 "teacher.device=cuda", "student.device=cuda"]) == 0
    assert (run_dir / "iter_1" / "metrics.json").is_file()
