from mmdc.data.record import Instance
from mmdc.evaluation import column_scores, format_columns, skill_scores


def _i(i, subject, context, image, grade, answer=0, skill="s"):
    return Instance(id=str(i), question="q", choices=["a", "b"], answer=answer,
                    image="x.png" if image else None, context=context, subject=subject,
                    grade=grade, skill=skill)


def test_column_arithmetic_hand_computed():
    items = [
        _i(1, "natural science", "hint", True, 3),    # NAT TXT IMG G1-6   correct
        _i(2, "natural science", "", True, 8),        # NAT IMG G7-12      wrong
        _i(3, "social science", "hint", False, 5),    # SOC TXT G1-6       correct
        _i(4, "language science", "", False, 10),     # LAN NO G7-12       correct
        _i(5, "language science", "  ", False, 2),    # LAN NO (blank hint) G1-6  unparsed
    ]
    preds = [0, 1, 0, 0, None]
    c = column_scores(items, preds)
    assert c["NAT"] == {"acc": 50.0, "correct": 1, "count": 2}
    assert c["SOC"]["acc"] == 100.0 and c["LAN"]["acc"] == 50.0
    # TXT and IMG overlap on item 1; NO is neither
    assert (c["TXT"]["count"], c["TXT"]["correct"]) == (2, 2)
    assert (c["IMG"]["count"], c["IMG"]["correct"]) == (2, 1)
    assert (c["NO"]["count"], c["NO"]["correct"]) == (2, 1)
    assert (c["G1-6"]["count"], c["G1-6"]["correct"]) == (3, 2)
    assert (c["G7-12"]["count"], c["G7-12"]["correct"]) == (2, 1)
    assert c["Avg"] == {"acc": 60.0, "correct": 3, "count": 5}


def test_empty_column_is_none_and_printed_as_dash():
    c = column_scores([_i(1, "natural science", "", True, 1)], [0])
    assert c["SOC"]["acc"] is None
    table = format_columns({"m": c})
    assert "| m | 100.00 | - | - |" in table


def test_skill_scores():
    items = [_i(1, "natural science", "", True, 1, skill="a"),
             _i(2, "natural science", "", True, 1, skill="a"),
             _i(3, "natural science", "", True, 1, skill="b")]
    s = skill_scores(items, [0, 1, 0])
    assert s["a"] == {"correct": 1, "count": 2, "acc": 50.0} and s["b"]["acc"] == 100.0
