"""Every file a resumed run reads back is checked: a damaged ``state.json`` (cut in half,
empty, not JSON, the wrong shape) is one line naming it and what to do, exit 2, nothing
touched; a finished step whose files were damaged since (truncated, emptied, not JSON,
the wrong shape, removed: per-iteration JSONL, metrics, adapters and their configs) is
redone in its place, and the resumed run equals an uninterrupted one; a damaged
generation journal or answer cache is dropped with a warning and regenerated exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmdc.cli import main
from tests.conftest import TINY, small_data_overrides


def _half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "cut in half": _half,
    "empty": lambda p: p.write_bytes(b""),
    "not JSON": lambda p: p.write_text("{oops"),
    "the wrong shape": lambda p: p.write_text('{"done": 3}\n'),
    "a list": lambda p: p.write_text("[]\n"),
    "removed": lambda p: p.unlink(),
}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    base = tmp_path_factory.mktemp("damaged")
    args = [*small_data_overrides(base / "data"), *TINY, "eval.batch_size=4"]
    assert main(["run", f"run_dir={base / 'whole'}", *args]) == 0
    return base / "whole", args


def _copy(whole_dir: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(whole_dir, run_dir)  # the same run, moved to another folder
    return run_dir


def _same_as(run_dir: Path, whole_dir: Path) -> int:
    """Every JSON, JSONL and weight file of the run equals the uninterrupted run's."""
    compared = 0
    for path in sorted(whole_dir.rglob("*")):
        rel = path.relative_to(whole_dir)
        if rel.parts[0] in ("tensorboard", "cache") or not path.is_file():
            continue
        if path.suffix in (".json", ".jsonl"):
            a = path.read_text().replace(str(whole_dir), "RUN")
            b = (run_dir / rel).read_text().replace(str(run_dir), "RUN")
            assert a == b, rel
            compared += 1
        elif path.suffix == ".safetensors":
            assert path.read_bytes() == (run_dir / rel).read_bytes(), rel
            compared += 1
    return compared


@pytest.mark.parametrize("damage", ["cut in half", "empty", "not JSON", "the wrong shape",
                                    "a list"])
def test_a_damaged_state_json_is_one_line_and_touches_nothing(whole, tmp_path, capsys,
                                                              damage):
    whole_dir, args = whole
    run_dir = _copy(whole_dir, tmp_path)
    DAMAGE[damage](run_dir / "state.json")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["run", f"run_dir={run_dir}", *args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmdc: error:") and "Traceback" not in "\n".join(err)
    assert f"{run_dir / 'state.json'}: damaged" in err[-1] and "another run_dir" in err[-1]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# each: the damaged files (relative to the run folder, with what is done to them); every
# step that wrote one is redone in its place, and must give back its first files
REDO = {
    "one iteration's outputs": [("iter_1/generated_accepted.jsonl", "cut in half"),
                                ("iter_1/assessment.jsonl", "empty"),
                                ("iter_1/metrics.json", "not JSON"),
                                ("iter_1/imitate.json", "a list")],
    "adapters and the first steps": [
        ("iter_1/student_adapter/adapter_config.json", "cut in half"),
        ("align/student/adapter/adapter_model.safetensors", "removed"),
        ("baseline/metrics.json", "the wrong shape")],
}


@pytest.mark.parametrize("case", sorted(REDO))
def test_damaged_step_files_are_redone_to_the_uninterrupted_result(whole, tmp_path, capsys,
                                                                   caplog, case):
    whole_dir, args = whole
    run_dir = _copy(whole_dir, tmp_path)
    for rel, damage in REDO[case]:
        DAMAGE[damage](run_dir / rel)
    # the report says which file is damaged and how to redo its step, touching nothing
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged since" in err[0] and "mmdc run" in err[0], err
    assert main(["run", f"run_dir={run_dir}", *args, "--resume"]) == 0
    for rel, _ in REDO[case]:
        assert f"{run_dir / rel} (" in caplog.text  # named in the warning
    assert _same_as(run_dir, whole_dir) >= 20
    assert main(["report", str(run_dir)]) == 0


def test_a_damaged_journal_is_dropped_and_the_step_regenerated_exactly(whole, tmp_path):
    whole_dir, args = whole
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MMDC_FAILPOINT="iter_1/evaluate:student@2")
    got = subprocess.run([sys.executable, "-m", "mmdc", "run", f"run_dir={run_dir}", *args],
                         env=env, capture_output=True, text=True)
    assert got.returncode == -signal.SIGKILL, got.stderr[-2000:]
    journal = run_dir / "cache" / "iter_1-evaluate.journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    assert len(lines) >= 3
    journal.write_text("".join(["{oops\n", *lines[1:]]))  # a line damaged, not a torn end
    got = subprocess.run([sys.executable, "-m", "mmdc", "run", f"run_dir={run_dir}", *args],
                         env=dict(env, MMDC_FAILPOINT=""), capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "damaged journal" in got.stderr
    assert _same_as(run_dir, whole_dir) >= 20


def test_damaged_answer_cache_lines_are_asked_again(tmp_path, caplog):
    from mmdc.models.backends import ResponseCache

    path = tmp_path / "openai-x.jsonl"
    cache = ResponseCache(path)
    for n in range(3):
        cache.put(f"k{n}", f"answer {n}")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[0], "{oops\n", '{"key": 3}\n', lines[2]]))
    again = ResponseCache(path)
    assert len(again) == 2 and again.get("k0") == "answer 0" and again.get("k1") is None
    assert "malformed" in caplog.text and "asked again" in caplog.text
    json.loads(path.read_text().splitlines()[0])  # what was good is kept as it was
