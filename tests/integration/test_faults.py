"""Kill-and-resume: the run is SIGKILLed at 12 points across every step (training steps,
mid-generation batches of the teacher and the student, right after a step is recorded),
resumed after each, and must end with the files of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import TINY, small_data_overrides

# step name and progress: "STEP:WHO@N" after generation batch N, "STEP@N" after training
# step N, "after:STEP" once the step is recorded (see mmdc.faults)
KILL_POINTS = [
    "align/student@2",
    "after:align",
    "iter_1/assess:teacher@1",
    "iter_1/assess:student@2",
    "iter_1/generate:teacher@1",
    "after:iter_1/generate",
    "iter_1/teacher_answers:teacher@1",
    "iter_1/teacher_answers:teacher@4",
    "iter_1/imitate@2",
    "iter_1/evaluate:student@3",
    "iter_2/teacher_answers:teacher@2",
    "iter_2/evaluate:teacher@5",
]


def _run(run_dir, args, point=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MMDC_FAILPOINT", None)
    if point:
        env["MMDC_FAILPOINT"] = point
    return subprocess.run([sys.executable, "-m", "mmdc", "run", f"run_dir={run_dir}", *args],
                          env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    data = small_data_overrides(tmp_path_factory.mktemp("faults") / "data")
    two = [a if a != "loop.iterations=1" else "loop.iterations=2" for a in TINY]
    # small batches: several checkpointed batches per generation step; sampling stays on
    return [*data, *two, "eval.batch_size=4"]


def test_killed_at_twelve_points_resumes_to_the_uninterrupted_result(tmp_path, args):
    whole = _run(tmp_path / "whole", args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    logs = []
    for point in KILL_POINTS:
        got = _run(killed, args, point)
        assert got.returncode == -signal.SIGKILL, (point, got.returncode, got.stderr[-1500:])
        logs.append(got.stderr)
    done = _run(killed, args)
    assert done.returncode == 0, done.stderr[-2000:]
    logs.append(done.stderr)
    # mid-generation kills were resumed from their journals, not redone
    assert sum("batches replayed" in log for log in logs) >= 5
    compared = 0
    for path in sorted((tmp_path / "whole").rglob("*")):
        rel = path.relative_to(tmp_path / "whole")
        if path.suffix == ".jsonl" or path.name.endswith("metrics.json"):
            a = path.read_text().replace(str(tmp_path / "whole"), "RUN")
            b = (killed / rel).read_text().replace(str(killed), "RUN")
            assert a == b, rel
            compared += 1
    assert compared >= 20
    assert (tmp_path / "whole" / "state.json").read_text() == (killed / "state.json").read_text()
    assert not (killed / "cache").exists()  # journals are gone once their steps finished


def test_truncated_files_of_finished_steps_are_redone(tmp_path, args):
    """A finished step's JSONL cut mid-line and its adapter cut short are damage, not a
    crash mid-append (those files are written whole and renamed): the steps that wrote
    them are redone in their place, each named in a warning, and the run goes on."""
    one = [a if a != "loop.iterations=2" else "loop.iterations=1" for a in args]
    run_dir = tmp_path / "run"
    assert _run(run_dir, one).returncode == 0
    pool = run_dir / "iter_1" / "teacher_answers.jsonl"
    text = pool.read_text()
    pool.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # torn last line
    adapter = run_dir / "iter_1" / "student_adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:200])
    before = json.loads((run_dir / "state.json").read_text())["done"]
    got = _run(run_dir, args)  # iteration 2 continues from the iteration-1 adapter
    assert got.returncode == 0, got.stderr[-2000:]
    for step, name in (("iter_1/teacher_answers", "teacher_answers.jsonl"),
                       ("iter_1/imitate", "adapter_model.safetensors")):
        assert any(name in line and f"{step} is redone" in line
                   for line in got.stderr.splitlines()), (step, got.stderr[-2000:])
    after = json.loads((run_dir / "state.json").read_text())["done"]
    assert after[: len(before)] == before and after[-1] == "iter_2/evaluate"
    assert pool.read_text() == text


def test_a_torn_pool_line_is_dropped_with_a_warning(tmp_path):
    from mmdc.data.pool import read_pool, write_dir_atomic, write_pool
    from mmdc.data.record import Instance

    path = write_pool(tmp_path / "pool.jsonl", [
        Instance(id=f"i{n}", question="q", choices=["a", "b"], answer=0) for n in range(3)])
    with open(path, "a") as f:
        f.write('{"id": "i3", "question": "half a rec')
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("mmdc").addHandler(handler)
    try:
        assert [i.id for i in read_pool(path)] == ["i0", "i1", "i2"]
    finally:
        logging.getLogger("mmdc").removeHandler(handler)
    assert any("partial" in r.getMessage() or "unterminated" in r.getMessage()
               for r in records)
    # a folder written atomically: a failing save leaves the old one whole
    folder = write_dir_atomic(tmp_path / "adapter", lambda d: (d / "a.txt").write_text("one"))

    def broken(d):
        (d / "a.txt").write_text("two")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomic(folder, broken)
    assert (folder / "a.txt").read_text() == "one" and len(list(tmp_path.iterdir())) == 2
