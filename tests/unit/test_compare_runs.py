"""scripts/compare_runs.py: two run folders compared byte for byte, paths aside."""

import importlib.util

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def _run(folder, answer: str):
    (folder / "iter_1" / "cache").mkdir(parents=True)
    (folder / "iter_1" / "metrics.json").write_text(f'{{"adapter": "{folder}/a", "acc": 1}}')
    (folder / "iter_1" / "teacher_answers.jsonl").write_text(f'{{"choice": {answer}}}\n')
    (folder / "iter_1" / "cache" / "x.journal.jsonl").write_text(str(folder))
    (folder / "state.json").write_text(str(folder))


def test_same_runs_in_other_folders_compare_equal_and_a_changed_answer_does_not(tmp_path, capsys):
    _run(tmp_path / "a", "0")
    _run(tmp_path / "b", "0")
    _run(tmp_path / "c", "1")
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "2 files compared, 0 differ" in capsys.readouterr().out
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "differs: iter_1/teacher_answers.jsonl" in capsys.readouterr().out
