import pytest

from mmdc.data.load import Split
from mmdc.data.record import Instance
from mmdc.data.scienceqa import read_scienceqa
from mmdc.models.load import load_model
from mmdc.stages.assess import AnswerAgreement, LikelihoodHardness, answer_logprobs, summarize
from mmdc.stages.imitate import answer_pool, cached_answers, imitation_rows, imitation_targets


@pytest.fixture(scope="module")
def teacher():
    return load_model("builtin:teacher", device="cpu")


@pytest.fixture(scope="module")
def probe(synth_root):
    split = Split("val", synth_root, read_scienceqa(synth_root, "val")[:8])
    return split.instances, [split.image(i) for i in split.instances]


def test_teacher_answers_are_cached(teacher, probe, tmp_path):
    instances, images = probe
    rows = answer_pool(teacher, instances, images, max_new_tokens=48)
    assert [r["id"] for r in rows] == [i.id for i in instances]
    assert all(r["output"] for r in rows)
    assert sum(r["choice"] is not None for r in rows) >= len(rows) // 2  # LEA answers parse
    path = tmp_path / "teacher_answers.jsonl"
    assert cached_answers(path, instances, lambda: rows) == rows

    def boom():
        raise AssertionError("recomputed although cached")

    assert cached_answers(path, instances, boom) == rows
    fresh = cached_answers(path, instances[:3], lambda: rows[:3])  # other ids: recompute
    assert [r["id"] for r in fresh] == [i.id for i in instances[:3]]


def _inst(i, answer=0, skill="count"):
    return Instance(id=str(i), question="q", choices=["a", "b", "c"], answer=answer, skill=skill)


def _row(i, choice, output="x"):
    return {"id": str(i), "prompt": "p", "output": output, "choice": choice}


def test_imitation_targets_drop_unparsable():
    insts = [_inst(1), _inst(2), _inst(3)]
    kept, targets, dropped = imitation_targets(
        insts, [_row(1, 0, "The answer is A."), _row(2, None, "??"), _row(3, 2, "C")])
    assert [k.id for k in kept] == ["1", "3"] and targets == ["The answer is A.", "C"]
    assert dropped == 1


def test_imitation_rows_carry_the_teachers_answer_in_each_format():
    insts = [_inst(1, answer=0), _inst(2), _inst(3, answer=0)]
    answers = [_row(1, 2, "Count them. The answer is C."), _row(2, None, "??"), _row(3, 1, "B")]
    rows, dropped = imitation_rows(insts, answers, [None] * 3, ["CQM-LEA", "CQM-A"])
    assert dropped == 1 and len(rows) == 4
    text = [r["completion"][0]["content"][0]["text"] for r in rows]
    # the teacher's answers, not the ground truth: LEA rows its whole output, A rows its letter
    assert text == ["Count them. The answer is C.", "B", "C", "B"]
    assert rows[2]["prompt"] != rows[0]["prompt"]  # each format's own prompt


def test_answer_agreement_never_uses_ground_truth():
    insts = [_inst(1, answer=0), _inst(2, answer=1), _inst(3), _inst(4, skill="spatial")]
    teacher = [_row(1, 2), _row(2, None), _row(3, 1), _row(4, 1)]
    student = [_row(1, 0), _row(2, 1), _row(3, None), _row(4, 1)]
    v = AnswerAgreement().judge(insts, teacher, student)
    # student matches the ground truth on 1 but not the teacher: hard all the same
    assert [x.hard for x in v] == [True, None, True, False]
    assert v[1].reason == "teacher answer unparsable"
    s = summarize(insts, v)
    assert s["total"] == {"hard": 2, "dropped": 1, "easy": 1}
    assert s["per_skill"]["spatial"] == {"easy": 1}


def test_likelihood_hardness(teacher, probe):
    instances, images = probe
    rows = answer_pool(teacher, instances, images, max_new_tokens=48)
    lp_own = answer_logprobs(teacher.model, teacher.processor, [r["prompt"] for r in rows],
                             images, [r["output"] for r in rows])
    lp_other = answer_logprobs(teacher.model, teacher.processor, [r["prompt"] for r in rows],
                               images, [r["output"][::-1] for r in rows])
    assert all(a > b for a, b in zip(lp_own, lp_other))  # its own greedy answer is likelier
    judge = dict(student_model=teacher.model, processor=teacher.processor, images=images)
    strict = LikelihoodHardness(threshold=1.01).judge(instances, rows, rows, **judge)
    lenient = LikelihoodHardness(threshold=0.0).judge(instances, rows, rows, **judge)
    parsed = [r["choice"] is not None for r in rows]
    assert [v.hard for v in strict] == [True if p else None for p in parsed]
    assert [v.hard for v in lenient] == [False if p else None for p in parsed]
    assert all(0.0 < v.score <= 1.0 for v in strict if v.hard is not None)
