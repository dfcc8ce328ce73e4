import random
from types import SimpleNamespace

import pytest

from mmdc.artifacts import GenerationReport
from mmdc.data.prompts import format_written
from mmdc.data.record import Instance
from mmdc.stages.generate import DuplicateFilter, parse_instance
from mmdc.stages.seeds import Seed, select_seeds
from mmdc.stages.verify import majority


def _inst(i, image="images/a.png", skill="count", question="How many shapes are there?"):
    return Instance(id=str(i), question=question, choices=["1", "2"], answer=0, image=image,
                    skill=skill, subject="natural science", grade=3)


def test_select_seeds_ratio_and_fresh_images():
    hard = [_inst(f"h{i}") for i in range(10)]
    easy = [_inst(f"e{i}", skill="color") for i in range(10)]
    pool = [f"images/pool/{i}.png" for i in range(100)]
    seeds = select_seeds(hard, easy, 20, pool, random.Random(0), hard_share=0.5)
    modes = [s.mode for s in seeds]
    assert modes.count("same") == 10 and modes.count("rarer") == 10
    images = [s.image for s in seeds]
    assert len(set(images)) == 20 and set(images) <= set(pool)
    # more hard seeds than hard instances: drawn again, each time on a fresh image
    seeds = select_seeds(hard[:3], easy, 20, pool, random.Random(0), hard_share=0.75)
    assert [s.mode for s in seeds].count("same") == 15
    assert {s.instance.id for s in seeds if s.mode == "same"} == {"h0", "h1", "h2"}
    assert len({s.image for s in seeds}) == 20
    assert len(select_seeds(hard, [], 5, pool, random.Random(0))) == 5
    assert [s.mode for s in select_seeds([], easy, 5, pool, random.Random(0))] == ["rarer"] * 5
    text_only = _inst("t", image=None, skill="alphabet")
    (s,) = select_seeds([text_only], [], 1, [], random.Random(0))
    assert s.image is None


def test_parse_instance_keeps_provenance():
    seed = Seed(_inst("s1"), "same", "images/pool/7.png")
    written = format_written(_inst("x", question="How many red shapes are there?"))
    inst = parse_instance(written, seed, "gen-1-0", iteration=1)
    assert inst.image == "images/pool/7.png" and inst.skill == "count"
    assert inst.source == "teacher" and inst.iteration == 1 and inst.meta["seed_id"] == "s1"
    assert inst.context == ""
    hinted = parse_instance("Context: The top is north.\n" + written, seed, "gen-1-3", 1)
    assert hinted.context == "The top is north."
    rarer = parse_instance(written, Seed(_inst("s2"), "rarer", None), "gen-1-1", 1)
    assert rarer.skill == "" and rarer.meta["seed_skill"] == "count"
    with pytest.raises(ValueError):
        parse_instance("Question: x\nAnswer: A", seed, "gen-1-2", 1)


def test_duplicates_are_scoped_to_the_same_image():
    pool = [_inst(1, image="a.png", question="How many red shapes are in the picture?")]
    f = DuplicateFilter(pool, threshold=0.7)
    same_image = _inst(2, image="a.png", question="How many blue shapes are in the picture?")
    new_image = _inst(3, image="b.png", question="How many red shapes are in the picture?")
    different = _inst(4, image="a.png", question="Will these magnets attract or repel?")
    assert f.is_duplicate(same_image) and f.max_similarity(same_image) > 0.8
    assert not f.is_duplicate(new_image)
    assert not f.is_duplicate(different)
    f.add(new_image)
    assert f.is_duplicate(_inst(5, image="b.png", question="How many red shapes are there in the picture?"))


def test_duplicates_need_the_same_options():
    """A known wording with new options is a new question (ScienceQA's text-only stems)."""
    stem = "Which word would come first in alphabetical order?"

    def words(i, choices, context=""):
        return Instance(id=str(i), question=stem, choices=choices, answer=0, image=None,
                        context=context, skill="alphabet")

    f = DuplicateFilter([words(1, ["moon", "apple", "kite"])], threshold=0.7)
    assert f.is_duplicate(words(2, ["kite", "apple", "moon"]))  # same options, reordered
    assert f.is_duplicate(words(3, ["moon", "apple"]))  # two of three: Jaccard 2/3
    assert not f.is_duplicate(words(4, ["cat", "dog", "zoo"]))
    assert not f.is_duplicate(words(5, ["moon", "cat", "dog"]))  # one shared: Jaccard 1/5
    assert f.max_similarity(words(6, ["cat", "dog"])) == 0.0
    # a long context that differs makes the question itself new
    g = DuplicateFilter([words(7, ["yes", "no"], "The text: the fox ran off the hill.")], 0.7)
    assert g.is_duplicate(words(8, ["yes", "no"], "The text: the fox ran off the hill."))
    assert not g.is_duplicate(words(9, ["yes", "no"],
                                    "Mona will print her name on the form before noon today."))


def test_majority_and_report():
    assert majority([1, 1, 0, None]) == (1, 0.5)
    assert majority([None, None]) == (None, 0.0)
    assert majority([2, 2, 2]) == (2, 1.0)
    r = GenerationReport(asked=3)
    r.dropped["malformed"] += 1
    r.count("count", "accepted")
    d = r.to_dict()
    assert d["dropped"] == {"malformed": 1, "duplicate": 0, "unverified": 0, "not_challenging": 0,
                           "over_budget": 0}
    assert d["per_skill"] == {"count": {"accepted": 1}}


def test_generate_instances_end_to_end(synth_root):
    """The toy teacher writes on pool images; every outcome is a valid record or a counted
    drop, never a crash; accepted records load back through the pool reader."""
    from mmdc.data.images import load_image
    from mmdc.data.load import read_image_pool
    from mmdc.data.pool import read_pool, write_pool
    from mmdc.data.scienceqa import read_scienceqa
    from mmdc.models.load import load_model
    from mmdc.stages.generate import generate_instances

    teacher = load_model("builtin:teacher", device="cpu")
    student = load_model("builtin:student", device="cpu")
    train = read_scienceqa(synth_root, "train")
    pool = [r["image"] for r in read_image_pool(synth_root)]
    seeds = select_seeds(train[:4], train[4:8], 6, pool, random.Random(0))
    accepted, rejected, report = generate_instances(
        teacher, student, seeds, lambda rel: load_image(synth_root, rel, rel),
        existing=train, iteration=1, k=3, tau=0.6)
    d = report.to_dict()
    assert d["asked"] == len(seeds) == report.accepted + sum(d["dropped"].values())
    assert len(rejected) == sum(d["dropped"].values())
    assert all(r["reason"] in d["dropped"] for r in rejected)
    for inst in accepted:
        assert inst.source == "teacher" and inst.iteration == 1 and inst.meta["agreement"] >= 0.6
    out = write_pool(synth_root.parent / "gen.jsonl", accepted)
    assert [i.id for i in read_pool(out)] == [i.id for i in accepted]


def test_unparsable_teacher_output_is_counted_not_raised(monkeypatch):
    """A teacher that writes garbage: every instance is dropped as malformed and counted."""
    from mmdc.stages.generate import generate_instances

    def garbage(requests, **kw):
        return ["Question: ???", "", "Options: (A) x", "\u0000 nonsense"][: len(requests)]

    seeds = [Seed(_inst(f"s{i}"), "same", None) for i in range(4)]
    nobody = SimpleNamespace(generate=garbage)
    accepted, rejected, report = generate_instances(nobody, nobody, seeds, lambda rel: None,
                                                    existing=[], iteration=2)
    assert accepted == [] and report.to_dict()["dropped"]["malformed"] == 4
    assert {r["reason"] for r in rejected} == {"malformed"}


def test_max_accepted_caps_the_budget_and_counts_the_rest(monkeypatch):
    """Strategies are compared at an equal budget: beyond max_accepted, verified
    instances are dropped as over_budget (counted, kept in the rejected rows)."""
    from mmdc.stages.generate import generate_instances

    def teacher(requests, **kw):
        if requests[0].prompt.startswith("Seed question"):  # writing
            words = "apple bird cat dog egg fish goat hat ink jam kite lamp moon nest owl".split()
            return [format_written(_inst(f"w{i}", question=" ".join(words[3 * i:3 * i + 3])))
                    for i in range(len(requests))]
        return ["The answer is A."] * len(requests)  # every vote agrees

    seeds = [Seed(_inst(f"s{i}"), "same", None) for i in range(5)]
    nobody = SimpleNamespace(generate=teacher)
    accepted, rejected, report = generate_instances(
        nobody, nobody, seeds, lambda rel: None, existing=[], iteration=1, k=3,
        challenge=False, max_accepted=2)
    assert len(accepted) == 2 and report.accepted == 2
    assert report.to_dict()["dropped"]["over_budget"] == 3
    assert [r["reason"] for r in rejected] == ["over_budget"] * 3


def test_challenge_by_kind_keeps_a_guessing_students_both_answers():
    from mmdc.stages.verify import mastered_kinds

    def inst(n, seed_skill, mode="same"):
        return Instance(id=f"g{n}", question="q", choices=["a", "b"], answer=n % 2,
                        skill=seed_skill, meta={"seed_skill": seed_skill, "mode": mode})

    # magnets: the student guesses "a" every time, right on half; count: right on 9 of 10
    insts = [inst(n, "magnets") for n in range(4)] + [inst(n, "count") for n in range(10)]
    agrees = [n % 2 == 0 for n in range(4)] + [n != 3 for n in range(10)]
    kept = [not m for m in mastered_kinds(insts, agrees, 0.9)]
    assert kept[:4] == [True] * 4  # both answers stay: no bias learned from the filter
    assert kept[4:] == [False] * 10  # a mastered kind is dropped whole
    # the same seed skill written in the other mode is another kind
    other = [inst(0, "count", "rarer")]
    assert mastered_kinds(other, [False], 0.9) == [False]


def test_kinds_follow_the_lecture_the_teacher_wrote_when_it_is_shared():
    """Instances written for one seed skill can be questions of another (the image could
    not carry the seed's skill): a shared lecture says which skill each one exercises, so
    the student's mastery of the others does not hide the one it has not learnt."""
    from mmdc.stages.verify import kinds_of, mastered_kinds

    def inst(n, seed_skill, lecture):
        return Instance(id=f"g{n}", question="q", choices=["a", "b"], answer=0,
                        lecture=lecture, skill=seed_skill,
                        meta={"seed_skill": seed_skill, "mode": "same"})

    compare, shape = "To compare two amounts, count each.", "Squares have four corners."
    # written for compare seeds: 3 compare questions the student misses, 27 shape
    # questions it knows
    insts = ([inst(n, "compare", compare) for n in range(3)]
             + [inst(n, "compare", shape) for n in range(3, 30)])
    agrees = [False] * 3 + [True] * 27
    assert sum(agrees) / len(agrees) == 0.9  # by request: all 30 "mastered"
    mastered = mastered_kinds(insts, agrees, 0.9)
    assert mastered == [False] * 3 + [True] * 27
    assert kinds_of(insts)[0] == ("lecture", compare)
    # a lecture shared by fewer than 3 (a free-form one) falls back to the request's kind
    lone = [inst(0, "magnets", "one"), inst(1, "magnets", "two")]
    assert kinds_of(lone) == [("magnets", "same")] * 2


def test_similar_pairing_writes_a_magnet_seed_on_a_magnet_image():
    """generate.pair_images=similar: a seed's new instance goes on one of the free pool
    images that look most like the seed's own in the (frozen) vision tower, so that the
    image can carry the seed's skill; any free image otherwise."""
    from mmdc.models.load import load_model
    from mmdc.stages.seeds import embed_images, rank_by_similarity
    from mmdc.toy import world

    rng = random.Random(0)
    scenes = {f"pool/o{i}.png": world.random_object_scene(rng, 1, 5) for i in range(24)}
    scenes.update({f"pool/m{i}.png": world.random_magnet_scene(rng) for i in range(8)})
    scenes["seed/m.png"] = world.random_magnet_scene(rng)
    loaded = load_model("builtin:student", device="cpu")
    paths = list(scenes)
    vectors = dict(zip(paths, embed_images(loaded.model, loaded.processor,
                                           [world.draw_scene(scenes[p]) for p in paths],
                                           batch_size=8), strict=True))
    assert rank_by_similarity(vectors, "seed/m.png", ["pool/o0.png", "pool/m0.png"])[0] \
        == "pool/m0.png"
    pool = [p for p in paths if p.startswith("pool/")]
    seed = _inst(0, image="seed/m.png", skill="magnets")
    near = lambda image, free: rank_by_similarity(vectors, image, free)  # noqa: E731
    seeds = select_seeds([seed], [], 4, pool, random.Random(1), near=near)
    # each from the nearest tenth of the free images (3 of 32): 8 magnet images, 4 seeds
    assert len({s.image for s in seeds}) == 4
    assert all(s.image.startswith("pool/m") for s in seeds)
    blind = select_seeds([seed], [], 4, pool, random.Random(1))
    assert len({s.image for s in blind}) == 4
    assert sum(s.image.startswith("pool/m") for s in blind) < 4


def test_a_generated_instance_takes_the_skill_its_lecture_belongs_to():
    """An image that cannot carry the seed's skill gets a question of another; the
    lecture the teacher wrote says which (counted so in the generation report)."""
    from mmdc.stages.generate import generate_instances, lecture_skills

    magnets = Instance(id="m", question="Attract or repel?", choices=["attract", "repel"],
                       answer=0, skill="magnets", lecture="Opposite poles attract.")
    shared = Instance(id="x", question="q", choices=["a", "b"], answer=0, skill="color",
                      lecture="One lecture for two skills.")
    known = lecture_skills([magnets, shared, Instance(
        id="y", question="q", choices=["a", "b"], answer=0, skill="shape",
        lecture="One lecture for two skills."), Instance(
        id="g", question="q", choices=["a", "b"], answer=0, skill="count",
        lecture="Written.", split="generated")])
    assert known == {"Opposite poles attract.": "magnets"}

    def teacher(requests, **kw):
        if requests[0].prompt.startswith("Seed question"):
            out = []
            for i, lecture in enumerate(["Opposite poles attract.", "A new lecture."]):
                inst = _inst(f"w{i}", image=None, question=f"Question number {i}?")
                inst.lecture = lecture
                out.append(format_written(inst))
            return out
        return ["The answer is A."] * len(requests)

    seeds = [Seed(_inst(f"s{i}", skill="spatial"), "same", None) for i in range(2)]
    nobody = SimpleNamespace(generate=teacher)
    accepted, _, report = generate_instances(nobody, nobody, seeds, lambda rel: None,
                                             existing=[magnets], iteration=1, k=2,
                                             challenge=False)
    assert [i.skill for i in accepted] == ["magnets", "spatial"]  # unknown lecture: the seed's
    assert report.to_dict()["per_skill"] == {"magnets": {"accepted": 1},
                                            "spatial": {"accepted": 1}}
    assert accepted[0].meta["seed_skill"] == "spatial"


def test_refill_seeds_draw_again_from_the_seeds_whose_instances_were_kept():
    from mmdc.stages.seeds import refill_seeds

    seeds = [Seed(_inst("h1"), "same", "p/0.png"), Seed(_inst("h2"), "same", "p/1.png"),
             Seed(_inst("e1", skill="color"), "rarer", "p/2.png")]
    kept = [Instance(id="gen-1-00000", question="q", choices=["a", "b"], answer=0,
                     meta={"seed_id": sid, "mode": mode}) for sid, mode in
            [("h1", "same"), ("h1", "same"), ("e1", "rarer")]]
    pool = [f"p/{i}.png" for i in range(3, 40)]
    more = refill_seeds(kept, seeds, 12, pool, random.Random(0))
    assert len(more) == 12 and len({s.image for s in more}) == 12 and {s.image for s in more} <= set(pool)
    assert {(s.instance.id, s.mode) for s in more} == {("h1", "same"), ("e1", "rarer")}
    assert [s.mode for s in more].count("same") == 8  # the kept seeds' share: 2 of 3
    assert refill_seeds([], seeds, 12, pool, random.Random(0)) == []
    assert refill_seeds(kept, seeds, 0, pool, random.Random(0)) == []


def test_report_merge_adds_a_refill_rounds_counts():
    a, b = GenerationReport(asked=4, accepted=1), GenerationReport(asked=2, accepted=2)
    a.dropped["unverified"] += 3
    a.count("count", "accepted")
    b.count("count", "accepted")
    b.count("compare", "accepted")
    a.merge(b)
    d = a.to_dict()
    assert (d["asked"], d["accepted"], d["dropped"]["unverified"]) == (6, 3, 3)
    assert d["per_skill"] == {"compare": {"accepted": 1}, "count": {"accepted": 2}}


def test_instance_ids_continue_from_first_id():
    from mmdc.stages.generate import generate_instances

    def teacher(requests, **kw):
        return ["Question: ???"] * len(requests)

    seeds = [Seed(_inst(f"s{i}"), "same", None) for i in range(2)]
    nobody = SimpleNamespace(generate=teacher)
    _, rejected, _ = generate_instances(nobody, nobody, seeds, lambda rel: None, existing=[],
                                        iteration=3, first_id=192)
    assert [r["id"] for r in rejected] == ["gen-3-00192", "gen-3-00193"]


def test_refill_rounds_fill_the_cap_from_the_kept_seeds(monkeypatch):
    """The challenge filter leaves the iteration short of max_accepted: more rounds are
    written from the seeds whose instances were kept, each asked for what is still missing,
    numbered after what was asked, checked for duplicates against what was kept, until the
    cap is filled or generate.refill rounds have run."""
    from mmdc import writing
    from mmdc.config import Config

    calls = []

    def write(loop, k, prefix, seeds, *, challenge, max_accepted=None, first_id=0, also=()):
        calls.append((prefix, len(seeds), max_accepted, first_id, len(also)))
        new = [Instance(id=f"gen-{k}-{first_id + n:05d}", question="q", choices=["a", "b"],
                        answer=0, meta={"seed_id": s.instance.id, "mode": s.mode})
               for n, s in enumerate(seeds[:min(3, max_accepted or 3)])]
        report = GenerationReport(asked=len(seeds), accepted=len(new))
        report.dropped["not_challenging"] += len(seeds) - len(new)
        return new, [{"id": "x", "reason": "not_challenging"}] * (len(seeds) - len(new)), report

    monkeypatch.setattr(writing, "write_generation", write)
    cfg = Config.model_validate({"generate": {"max_accepted": 8, "refill": 3}})
    loop = SimpleNamespace(cfg=cfg, pool_images=[f"p/{i}.png" for i in range(50)],
                           used_images=set())
    seeds = [Seed(_inst(f"h{i}"), "same", f"p/{i}.png") for i in range(10)]
    accepted, rejected, report = write(loop, 1, "generate", seeds, challenge=True)
    calls.clear()
    writing.refill(loop, 1, seeds, accepted, rejected, report, random.Random(0))
    # 3 kept of 8: 10 seeds for the 5 missing; 6 kept: 4 seeds for the 2 missing; full
    assert calls == [("generate_refill1", 10, 5, 10, 3), ("generate_refill2", 4, 2, 20, 6)]
    assert len(accepted) == 8 and report.accepted == 8 and report.asked == 24
    assert len({i.id for i in accepted}) == 8
    assert report.dropped["not_challenging"] == len(rejected) == 7 + 7 + 2
    cfg.generate.refill = 0
    calls.clear()
    writing.refill(loop, 1, seeds, accepted[:3], [], GenerationReport(), random.Random(0))
    assert calls == []



def test_writing_yield_counts_what_the_teacher_could_verify_for_hard_seeds():
    """generate.by_yield: per seed skill, (verified + 1) / (written and judged + 2) over the
    instances written for hard seeds; easy seeds and drops before verification (malformed,
    duplicate) do not count."""
    from mmdc.stages.seeds import writing_yield

    def rec(seed_skill, mode="same"):
        return {"meta": {"seed_skill": seed_skill, "mode": mode}}

    accepted = [Instance(id=f"a{n}", question="q", choices=["a", "b"], answer=0,
                         meta={"seed_skill": "compare", "mode": "same"}) for n in range(3)]
    rejected = ([{"reason": "unverified", "record": rec("spatial")}] * 4
                + [{"reason": "not_challenging", "record": rec("spatial")}]
                + [{"reason": "over_budget", "record": rec("compare")}]
                + [{"reason": "unverified", "record": rec("color", "rarer")}] * 5
                + [{"reason": "duplicate", "record": rec("spatial")}] * 3
                + [{"reason": "malformed", "seed_id": "x"}])
    share = writing_yield(accepted, rejected)
    assert share == {"compare": (4 + 1) / (4 + 2), "spatial": (1 + 1) / (5 + 2)}


def test_hard_weights_draw_the_hard_seeds_in_proportion():
    hard = [_inst("h0", skill="spatial"), _inst("h1", skill="compare")]
    pool = [f"images/pool/{i}.png" for i in range(400)]
    seeds = select_seeds(hard, [], 300, pool, random.Random(0), hard_weights=[0.1, 0.9])
    drawn = [s.instance.id for s in seeds].count("h0")
    assert 10 <= drawn <= 50  # 30 expected of 300
    same = select_seeds(hard, [], 50, pool, random.Random(1))
    assert [s.instance.id for s in same] == [
        s.instance.id for s in select_seeds(hard, [], 50, pool, random.Random(1),
                                            hard_weights=[1.0, 1.0])]


@pytest.mark.parametrize("written_vote", [True, False])
def test_written_label_as_a_vote(written_vote):
    """verify.written_vote: the teacher writes (A) but answers (B) every time it is asked.
    With its written label as a vote, 3 of 4 agree (under tau 0.9): unverified; without,
    the samples are unanimous and their label replaces the written one."""
    from mmdc.stages.generate import generate_instances

    def teacher(requests, **kw):
        if requests[0].prompt.startswith("Seed question"):  # writing: the label is A
            return [format_written(_inst("w", question="How many red shapes are there?"))]
        return ["The answer is B."] * len(requests)

    nobody = SimpleNamespace(generate=teacher)
    accepted, rejected, _ = generate_instances(
        nobody, nobody, [Seed(_inst("s"), "same", None)], lambda rel: None, existing=[],
        iteration=1, k=3, tau=0.9, challenge=False, written_vote=written_vote)
    if written_vote:
        assert accepted == [] and rejected[0]["reason"] == "unverified"
    else:
        (inst,) = accepted
        assert inst.answer == 1 and inst.meta["written_answer"] == 0


def test_yield_weights_read_the_earlier_iterations(tmp_path):
    """The loop weighs each hard probe by its skill's writing yield in the iterations
    before (none in the first, none unless generate.by_yield and targeted)."""
    from mmdc.data.pool import write_jsonl
    from mmdc.writing import yield_weights as _yield_weights

    (tmp_path / "iter_1").mkdir()
    write_jsonl(tmp_path / "iter_1" / "generated_rejected.jsonl",
                [{"reason": "unverified", "record": {"meta": {"seed_skill": "spatial",
                                                              "mode": "same"}}}] * 2)
    kept = Instance(id="g", question="q", choices=["a", "b"], answer=0, iteration=1,
                    meta={"seed_skill": "compare", "mode": "same"})

    def loop(by_yield, strategy="targeted"):
        cfg = SimpleNamespace(generate=SimpleNamespace(by_yield=by_yield),
                              loop=SimpleNamespace(strategy=strategy))
        return SimpleNamespace(cfg=cfg, generated=[kept], it=lambda j: tmp_path / f"iter_{j}")

    hard = [_inst("h0", skill="spatial"), _inst("h1", skill="compare"), _inst("h2")]
    assert _yield_weights(loop(True), 2, hard) == [1 / 4, 2 / 3, 1.0]
    assert _yield_weights(loop(True), 1, hard) is None
    assert _yield_weights(loop(False), 2, hard) is None
    assert _yield_weights(loop(True, "random"), 2, hard) is None
