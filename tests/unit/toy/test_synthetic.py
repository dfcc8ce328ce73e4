import json
import random
from collections import Counter

import pytest

from mmdc.config import Config
from mmdc.data.load import SYNTH_MARKER, Split
from mmdc.data.scienceqa import read_scienceqa
from mmdc.errors import DataError
from mmdc.evaluation import columns_of
from mmdc.toy import world
from mmdc.toy.task import ensure_synthetic
from tests.conftest import SMALL


def test_deterministic_by_seed():
    a = [(i.to_dict(), img.tobytes() if img else None)
         for i, img in world.generate_split("test", 20, seed=3)]
    b = [(i.to_dict(), img.tobytes() if img else None)
         for i, img in world.generate_split("test", 20, seed=3)]
    c = [i.to_dict() for i, _ in world.generate_split("test", 20, seed=4)]
    assert a == b
    assert [x for x, _ in a] != c


def test_at_least_six_skills_graded():
    assert len(world.SKILLS) >= 6
    grades = [s.grade for s in world.SKILLS.values()]
    assert grades == sorted(grades)
    assert world.HARD_SKILLS and world.EASY_SKILLS


def test_answers_follow_from_the_scene():
    rng = random.Random(0)
    for _ in range(200):
        inst = world.make_instance("count_color", rng, "x", "t")
        color = inst.question.split()[2]
        n = sum(o["color"] == color for o in inst.meta["scene"]["objects"])
        assert inst.choices[inst.answer] == str(n)
        inst = world.make_instance("magnets", rng, "x", "t")
        poles = inst.meta["scene"]["poles"]
        assert inst.choices[inst.answer] == ("attract" if poles[1] != poles[2] else "repel")
        inst = world.make_instance("compare", rng, "x", "t")
        objs = inst.meta["scene"]["objects"]
        counts = {c: sum(o["color"] == c for o in objs) for c in inst.choices}
        assert inst.choices[inst.answer] == max(counts, key=counts.get)
        inst = world.make_instance("alphabet", rng, "x", "t")
        assert inst.choices[inst.answer] == min(inst.choices) and inst.image is None


def test_drawn_pixels_match_scene():
    scene = {"kind": "objects", "objects": [{"row": 1, "col": 2, "shape": "square",
                                             "color": "blue"}]}
    img = world.draw_scene(scene)
    assert img.size == (32, 32)
    assert img.getpixel((2 * 8 + 3, 1 * 8 + 3)) == world.COLORS["blue"]
    assert img.getpixel((3, 3)) == (255, 255, 255)


def test_every_scienceqa_column_has_items():
    insts = [i for i, _ in world.generate_split("test", 400, seed=0)]
    cols = Counter(c for i in insts for c in columns_of(i))
    for col in ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"):
        assert cols[col] > 0, col


def test_seed_split_is_skewed_test_split_balanced():
    train = Counter(i.skill for i, _ in world.generate_split("train", 400, seed=0))
    test = Counter(i.skill for i, _ in world.generate_split("test", 400, seed=0))
    for hard in world.HARD_SKILLS:
        for easy in world.EASY_SKILLS:
            assert train[hard] * 3 < train[easy]
    assert max(test.values()) - min(test.values()) <= 2


def test_synth_output_loads_through_scienceqa_reader(synth_root):
    for split, n in (("train", SMALL.train), ("val", SMALL.val), ("test", SMALL.test)):
        insts = read_scienceqa(synth_root, split)
        assert len(insts) == n
        s = Split(split, synth_root, insts)
        s.load_images()
        with_image = [i for i in insts if i.image]
        assert with_image and all(s.image(i).size == (32, 32) for i in with_image)
    first = read_scienceqa(synth_root, "test")[0]
    assert first.source == "synthetic" and first.meta["scene"]
    assert (synth_root / "pool.jsonl").is_file()


def test_pool_images_are_drawn_as_the_seed_splits_are():
    """The unlabelled pool holds magnet pictures as rarely as the seed split does, so blind
    random generation cannot find more of them than the user's data has."""
    pool = Counter(scene["kind"] for _, scene, _ in world.generate_pool(600, seed=0))
    train = [i for i, _ in world.generate_split("train", 600, seed=0) if i.image]
    share = sum(i.skill == "magnets" for i in train) / len(train)
    assert abs(pool["magnets"] / 600 - share) < 0.02
    assert pool["magnets"] / 600 < 0.08  # version 1: 15%; the balanced test: 12.5%


def test_a_task_folder_with_an_earlier_pool_is_refused_by_name(tmp_path):
    synth = Config().data.synth
    sizes = {k: getattr(synth, k) for k in world.TaskSizes.__dataclass_fields__}
    (tmp_path / SYNTH_MARKER).write_text(json.dumps({"seed": synth.seed, "sizes": sizes}))
    with pytest.raises(DataError, match="as an earlier mmdc wrote it.*delete the folder"):
        ensure_synthetic(tmp_path, synth)
