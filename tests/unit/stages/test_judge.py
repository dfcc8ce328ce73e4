import json

import pytest

from mmdc.cli import main
from mmdc.data.record import Instance
from mmdc.openended import read_bench, relative_scores
from mmdc.stages.assess import JudgeReferee, parse_scores


@pytest.mark.parametrize("text,expected", [
    ("8 6\nAssistant 1 is better.", (8.0, 6.0)), ("10, 9", (10.0, 9.0)), ("7.5 3", (7.5, 3.0)),
    ("The first is better", None), ("", None), ("11 3", None), ("0 5", None),
])
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


class ScriptedJudge:
    """Stands in for the judge model's generations (unit tests only)."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def generate(self, requests, **kw):
        self.calls.append((len(requests), kw.get("do_sample")))
        return [self.replies.pop(0) for _ in requests]


def _referee(monkeypatch, replies, **kw):
    script = ScriptedJudge(replies)
    return JudgeReferee(script, **kw), script


def test_both_orders_are_averaged(monkeypatch):
    # order (teacher, student) then (student, teacher)
    ref, _ = _referee(monkeypatch, ["9 5", "6 8"])
    (pair,) = ref.score_pairs(["q"], [None], ["teacher answer"], ["student answer"])
    assert pair == (8.5, 5.5)


def test_hard_when_teacher_leads_by_threshold_and_unparsable_retried_then_dropped(monkeypatch):
    insts = [Instance(id=str(i), question="q", choices=[], answer=None) for i in range(3)]
    t = [{"output": "a"}] * 3
    s = [{"output": "b"}] * 3
    # first pass (6 prompts): item 2 unparsable in one order; retries: still unparsable twice
    # prompts: items 0,1,2 as (teacher, student), then items 0,1,2 as (student, teacher)
    ref, script = _referee(monkeypatch, ["8 7", "9 4", "x", "7 7", "4 9", "8 7",
                                         "no", "nope"], threshold=1.0, retries=2)
    v = ref.judge(insts, t, s)
    assert [x.hard for x in v] == [False, True, None]  # gaps 0.5 and 5; item 2 dropped
    assert v[2].reason == "judge unparsable" and ref.unparsable == 1
    assert script.calls == [(6, False), (1, True), (1, True)]


def test_relative_score_per_category():
    rows = [{"category": "conv"}, {"category": "detail"}, {"category": "conv"}]
    s = relative_scores(rows, [(8.0, 6.0), (10.0, 10.0), None])
    assert s["conv"]["relative"] == 75.0 and s["conv"]["unparsable"] == 1
    assert s["detail"]["relative"] == 100.0
    assert s["overall"]["relative"] == pytest.approx(100 * 8 / 9)


def test_read_bench_errors(tmp_path):
    q, r = tmp_path / "q.jsonl", tmp_path / "r.jsonl"
    q.write_text(json.dumps({"question_id": 1, "text": "Describe.", "category": "detail"}) + "\n")
    r.write_text(json.dumps({"question_id": 2, "text": "ref"}) + "\n")
    with pytest.raises(Exception, match="question 1 has no reference answer"):
        read_bench(q, r)


def test_eval_open_ended_cli_counts_unparsable_judgements(tmp_path, synth_root, capsys):
    """The toy teacher is no judge: its judgements do not parse and are counted."""
    q, r = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": f"images/pool/pool-0000{i}/image.png",
                                     "text": "Describe the picture.", "category": c}) + "\n"
                         for i, c in enumerate(["conv", "detail", "complex"])))
    r.write_text("".join(json.dumps({"question_id": i, "text": "Some shapes."}) + "\n"
                         for i in range(3)))
    code = main(["eval", "eval.max_new_tokens=16", "--model", "student", "--questions", str(q),
                 "--references", str(r), "--images", str(synth_root), "--out", str(tmp_path / "o")])
    assert code == 0
    scores = json.loads((tmp_path / "o" / "student_openended.json").read_text())
    assert scores["overall"]["scored"] + scores["overall"]["unparsable"] == 3
    assert "| overall |" in capsys.readouterr().out
