import json

import pytest

from mmdc.data.load import Split
from mmdc.data.scienceqa import read_scienceqa, read_scienceqa_hf, write_scienceqa
from mmdc.errors import DataError
from tests.conftest import edit_problem as _edit


def test_real_layout_text_only_and_unicode(mini):
    insts = read_scienceqa(mini, "test")
    assert [i.id for i in insts] == ["5", "9", "12", "17", "21"]
    by = {i.id: i for i in insts}
    assert by["5"].image is None and by["5"].context == ""
    assert by["9"].image == "images/test/9/image.png"
    assert "\u201cbanner\u201d" in by["5"].question
    assert by["17"].choices[0] == "caf\u00e9 au lait \u2615" and by["21"].grade == 9
    assert by["12"].subject == "natural science" and by["12"].has_context


def test_missing_problems_json(tmp_path):
    with pytest.raises(DataError, match=r"problems.json: file not found"):
        read_scienceqa(tmp_path, "test")


def test_missing_image_file(mini):
    (mini / "images/test/9/image.png").unlink()
    with pytest.raises(DataError, match=r"problem 9\).*image file not found"):
        read_scienceqa(mini, "test")


def test_unreadable_image(mini):
    (mini / "images/test/12/image.png").write_bytes(b"not a png")
    split = Split("test", mini, read_scienceqa(mini, "test"))
    with pytest.raises(DataError, match=r"id '12'.*unreadable image"):
        split.load_images()


def test_answer_out_of_range(mini):
    _edit(mini, "21", answer=7)
    with pytest.raises(DataError, match=r"problem 21.*'answer' = 7 is out of range"):
        read_scienceqa(mini, "test")


def test_empty_split(mini):
    with pytest.raises(DataError, match=r"pid_splits.json: split 'val' is empty"):
        read_scienceqa(mini, "val")


def test_unknown_split(mini):
    with pytest.raises(DataError, match=r"no split 'dev' \(available: minival, test"):
        read_scienceqa(mini, "dev")


def test_image_path_escaping_root(mini):
    _edit(mini, "9", image="../../../../etc/passwd")
    with pytest.raises(DataError, match=r"problem 9.*outside the dataset root"):
        read_scienceqa(mini, "test")


def test_malformed_json(mini):
    (mini / "problems.json").write_text('{"5": {', encoding="utf-8")
    with pytest.raises(DataError, match=r"problems.json: malformed JSON at line 1"):
        read_scienceqa(mini, "test")


def test_missing_field(mini):
    p = json.loads((mini / "problems.json").read_text(encoding="utf-8"))
    del p["17"]["choices"]
    (mini / "problems.json").write_text(json.dumps(p), encoding="utf-8")
    with pytest.raises(DataError, match=r"problem 17.*missing field 'choices'"):
        read_scienceqa(mini, "test")


def test_write_then_read_round_trip(mini, tmp_path):
    insts = read_scienceqa(mini, "test")
    split = Split("test", mini, insts)
    out = write_scienceqa(tmp_path / "copy", {"test": [(i, split.image(i)) for i in insts]})
    again = read_scienceqa(out, "test")
    assert [(i.id, i.question, i.choices, i.answer, i.context, i.grade, i.image is None)
            for i in again] == [(i.id, i.question, i.choices, i.answer, i.context, i.grade,
                                 i.image is None) for i in insts]


def _hf_rows(mini):
    from PIL import Image

    problems = json.loads((mini / "problems.json").read_text(encoding="utf-8"))
    rows = []
    for pid in ["5", "9", "12"]:
        p = problems[pid]
        img = Image.open(mini / f"images/test/{pid}/image.png") if p["image"] else None
        rows.append({"image": img, "question": p["question"], "choices": p["choices"],
                     "answer": p["answer"], "hint": p["hint"], "task": p["task"],
                     "grade": p["grade"], "subject": p["subject"], "topic": p["topic"],
                     "category": p["category"], "skill": p["skill"], "lecture": p["lecture"],
                     "solution": p["solution"]})
    return rows


def test_hf_column_layout_save_to_disk(mini, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(_hf_rows(mini), features=datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("int64"),
        **{k: datasets.Value("string") for k in ("hint", "task", "grade", "subject", "topic",
                                                  "category", "skill", "lecture", "solution")}}))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    insts = read_scienceqa_hf(tmp_path / "hf", "test", tmp_path / "imgs")
    assert len(insts) == 3 and insts[0].image is None and insts[1].image is not None
    split = Split("test", tmp_path / "imgs", insts)
    assert split.image(insts[1]).size == (64, 48)
    # parquet too
    ds.to_parquet(str(tmp_path / "test-00000.parquet"))
    again = read_scienceqa_hf(tmp_path / "test-00000.parquet", "test", tmp_path / "imgs2")
    assert [i.question for i in again] == [i.question for i in insts]
