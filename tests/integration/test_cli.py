import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmdc.cli import main
from tests.conftest import edit_problem as _edit


def run_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmdc: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "synth"], ["data", "export"], ["eval"],
                                 ["models"], ["models", "build-toy"], ["models", "info"],
                                 ["demo"], ["run"], ["report"], ["align"], ["calibrate"],
                                 ["export"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: mmdc" in capsys.readouterr().out


def test_eval_plain_llava_on_real_scienceqa_layout(plain_llava, mini, tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["eval", "data.format=scienceqa", f"data.root={mini}", "eval.max_new_tokens=3",
                 "--model", str(plain_llava), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| model | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in printed
    name = plain_llava.name
    result = json.loads((out / f"{name}_test_result.json").read_text())
    assert result["count"] == 5 and set(result["results"]) == {"5", "9", "12", "17", "21"}
    assert set(result) >= {"acc", "correct", "count", "results", "outputs"}
    samples = [json.loads(x) for x in (out / f"{name}_test_samples.jsonl").read_text().splitlines()]
    assert set(samples[0]) >= {"doc_id", "input", "target", "resps", "filtered_resps"}
    assert (out / "config.yaml").is_file()


def test_data_synth_then_export(tmp_path, capsys):
    root = tmp_path / "syn"
    assert main(["data", "synth", "--out", str(root), "--pretrain", "0", "--train", "8",
                 "--pool", "4", "--val", "8", "--test", "8"]) == 0
    assert (root / "problems.json").is_file() and (root / "pool.jsonl").is_file()
    out = tmp_path / "train.json"
    assert main(["data", "export", "data.format=scienceqa", f"data.root={root}", "--split",
                 "train", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 8


# ------------------------------------------------------------------- bad input


def test_malformed_yaml(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {format: scienceqa\n")
    msg = run_error(capsys, ["eval", str(cfg)])
    assert "c.yaml" in msg and "malformed YAML at line" in msg


def test_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher:\n  pth: x\n")
    msg = run_error(capsys, ["eval", str(cfg)])
    assert "unknown key 'teacher.pth'" in msg and "path" in msg


def test_wrong_type(capsys):
    msg = run_error(capsys, ["eval", "seed=abc"])
    assert "key 'seed'" in msg


def test_missing_problems_json(tmp_path, capsys):
    msg = run_error(capsys, ["eval", "data.format=scienceqa", f"data.root={tmp_path}"])
    assert "problems.json: file not found" in msg


def test_missing_image(mini, capsys):
    (mini / "images/test/12/image.png").unlink()
    msg = run_error(capsys, ["eval", "data.format=scienceqa", f"data.root={mini}"])
    assert "problem 12" in msg and "image file not found" in msg


def test_unreadable_image(mini, capsys, plain_llava):
    (mini / "images/test/9/image.png").write_bytes(b"\x89PNG garbage")
    msg = run_error(capsys, ["eval", "data.format=scienceqa", f"data.root={mini}",
                             "--model", str(plain_llava)])
    assert "id '9'" in msg and "unreadable image" in msg


def test_answer_out_of_range(mini, capsys):
    _edit(mini, "5", answer=-1)
    msg = run_error(capsys, ["eval", "data.format=scienceqa", f"data.root={mini}"])
    assert "problem 5" in msg and "'answer'" in msg


def test_empty_split(mini, capsys):
    msg = run_error(capsys, ["eval", "data.format=scienceqa", f"data.root={mini}",
                             "--split", "val"])
    assert "pid_splits.json" in msg and "'val' is empty" in msg


def test_image_path_escape(mini, capsys):
    _edit(mini, "12", image="../../../../secret.png")
    msg = run_error(capsys, ["eval", "data.format=scienceqa", f"data.root={mini}"])
    assert "problem 12" in msg and "outside the dataset root" in msg


def test_missing_model_folder(mini, capsys, tmp_path):
    msg = run_error(capsys, ["eval", "data.format=scienceqa", f"data.root={mini}",
                             "--model", str(tmp_path / "nope")])
    assert "model folder not found" in msg


def test_console_script_error_is_one_line(tmp_path):
    exe = Path(sys.executable).with_name("mmdc")
    proc = subprocess.run([str(exe), "eval", "data.format=scienceqa", f"data.root={tmp_path}"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mmdc: error: {tmp_path}/problems.json: file not found"]


# key=value overrides anywhere on the line: each command that reads the config reads an
# override that stands after its options (a bad value proves it was read: the error
# names the key before any work starts)
@pytest.mark.parametrize("argv", [
    ["eval", "--model", "builtin:student", "--split", "test", "verify.tau=2"],
    ["eval", "--model", "builtin:student", "verify.tau=2", "--split", "test"],
    ["data", "export", "--split", "train", "--out", "x.json", "verify.tau=2"],
    ["align", "verify.tau=2"],
    ["run", "--resume", "verify.tau=2"],
    ["calibrate", "--resume", "verify.tau=2"],
    ["demo", "verify.tau=2"],
    ["-v", "run", "--resume", "verify.tau=2"],
])
def test_overrides_after_options(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "verify.tau" in run_error(capsys, argv)


def test_config_file_after_options(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate:\n  tau: 3\n")
    assert "c.yaml" in run_error(capsys, ["eval", "--model", "builtin:student", str(cfg)])
    line = run_error(capsys, ["eval", str(cfg), "--model", "builtin:student", str(cfg)])
    assert "more than one config file" in line


def test_a_key_without_value_says_overrides_are_key_value(capsys):
    line = run_error(capsys, ["eval", "eval.batch_size", "--model", "builtin:student"])
    assert "overrides are key=value" in line and "eval.batch_size" in line


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--bogus", "eval.limit=2"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_per_skill_table_has_rows_when_there_are_many_skills():
    from mmdc.evaluation import format_skills

    few = format_skills({"student": {f"s{i}": {"acc": 50.0} for i in range(8)}})
    assert few.splitlines()[0].startswith("| model | s0 |") and len(few.splitlines()) == 3
    many = format_skills({"teacher": {f"s{i:02d}": {"acc": 90.0} for i in range(69)},
                          "student": {f"s{i:02d}": {"acc": 50.0} for i in range(68)}})
    lines = many.splitlines()
    assert lines[0] == "| skill | teacher | student |" and len(lines) == 2 + 69
    assert lines[-1] == "| s68 | 90.00 | - |"
