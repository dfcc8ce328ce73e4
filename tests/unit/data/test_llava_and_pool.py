import json

import pytest

from mmdc.data.llava import read_llava_json, to_llava, write_llava_json
from mmdc.data.pool import read_pool, write_pool
from mmdc.data.record import Instance
from mmdc.data.scienceqa import read_scienceqa
from mmdc.errors import DataError


def test_llava_round_trip(synth_root, tmp_path):
    insts = read_scienceqa(synth_root, "test")
    out = tmp_path / "images_root_is_dataset"
    path = write_llava_json(synth_root / "llava_test.json", insts, "CQM-LEA")
    entries = json.loads(path.read_text())
    img = next(e for e in entries if "image" in e)
    assert img["conversations"][0]["value"].startswith("<image>\n")
    assert img["conversations"][1]["from"] == "gpt"
    back = read_llava_json(path, synth_root)
    assert [(b.id, b.question, b.choices, b.answer, b.image, b.context) for b in back] == \
        [(i.id, i.question, i.choices, i.answer, i.image, i.context) for i in insts]
    assert not out.exists()


def test_llava_open_ended_entry(tmp_path):
    p = tmp_path / "conv.json"
    p.write_text(json.dumps([{"id": "a1", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is unusual about this image?"},
        {"from": "gpt", "value": "A man irons clothes on a taxi."}]}]))
    (inst,) = read_llava_json(p)
    assert inst.choices == [] and inst.answer is None
    assert inst.meta["reference"].startswith("A man") and inst.image == "x.jpg"


@pytest.mark.parametrize("entry,match", [
    ({"image": "x.png", "conversations": []}, "missing field 'id'"),
    ({"id": "1", "conversations": [{"from": "human", "value": "hi"}]}, "needs a human and a gpt"),
    ({"id": "1", "image": "x.png", "conversations": [{"from": "human", "value": "no tag"},
                                                     {"from": "gpt", "value": "x"}]},
     "no <image>"),
    ({"id": "1", "image": "../../x.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     "outside the dataset root"),
    ({"id": "1", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "'human' then a 'gpt'"),
])
def test_llava_bad_entries(tmp_path, entry, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([entry]))
    with pytest.raises(DataError, match=match):
        read_llava_json(p)


def test_llava_duplicate_ids(tmp_path):
    e = {"id": "1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    p = tmp_path / "dup.json"
    p.write_text(json.dumps([e, e]))
    with pytest.raises(DataError, match="entry 1: duplicate id '1'"):
        read_llava_json(p)


def test_to_llava_text_only_has_no_image_tag():
    inst = Instance(id="t", question="Which?", choices=["a", "b"], answer=0)
    (entry,) = to_llava([inst], "CQM-A")
    assert "image" not in entry and "<image>" not in entry["conversations"][0]["value"]
    assert entry["conversations"][1]["value"] == "A"


def test_pool_atomic_round_trip(tmp_path):
    insts = [Instance(id=f"g{i}", question="q\u00e9?", choices=["a", "b"], answer=i % 2,
                      skill="count", iteration=1, source="teacher") for i in range(3)]
    path = write_pool(tmp_path / "pool.jsonl", insts)
    assert read_pool(path) == insts
    assert [p.name for p in tmp_path.iterdir()] == ["pool.jsonl"]  # no temp files left


def test_pool_errors_name_line_and_id(tmp_path):
    p = tmp_path / "p.jsonl"
    good = Instance(id="a", question="q", choices=["x", "y"], answer=0).to_dict()
    bad = dict(good, id="b", answer=5)
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"record 2 \(id 'b'\).*out of range"):
        read_pool(p)
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"line 2: malformed JSON"):
        read_pool(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match="duplicate id 'a'"):
        read_pool(p)


def test_partial_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    """A crash mid-append leaves a partial, unterminated last line: it is dropped (with a
    warning naming the file and line) and every complete record is kept."""
    insts = [Instance(id=f"p{i}", question="Which?", choices=["a", "b"], answer=0)
             for i in range(3)]
    path = write_pool(tmp_path / "pool.jsonl", insts)
    whole = path.read_text()
    path.write_text(whole + json.dumps(insts[0].to_dict())[:25])  # a torn append
    with caplog.at_level("WARNING"):
        assert [i.id for i in read_pool(path)] == ["p0", "p1", "p2"]
    assert "line 4: dropping a partial last line" in caplog.text
    # a malformed line that is complete (newline-terminated), or not the last, is an error
    path.write_text(whole + "{oops\n")
    with pytest.raises(DataError, match=r"line 4: malformed JSON"):
        read_pool(path)
    lines = whole.splitlines()
    path.write_text("\n".join([lines[0], "{oops", *lines[1:]]))
    with pytest.raises(DataError, match=r"line 2: malformed JSON"):
        read_pool(path)
