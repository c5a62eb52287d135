"""Tower specs and schedules: snapping, strict errors, overrides, realized towers."""

import json

import pytest

from towerspace.models import xception
from towerspace.status import FAILED, Status
from towerspace.towers import (
    TowerLabel,
    TowerSchedule,
    TowerSpec,
    label_order,
    nearest_divisor,
    position,
    realize,
    realized_towers,
    tower_label,
)


def test_parse_forms():
    assert TowerSpec.parse(4) == TowerSpec("towers", 4)
    assert TowerSpec.parse("depthwise") == TowerSpec("towers", "depthwise")
    assert TowerSpec.parse({"group_width": 8}) == TowerSpec("group_width", 8)
    assert TowerSpec.parse({"position": 0.5}).label() == "t=0.50"
    assert TowerSpec.parse({"group_width": 8}).as_config() == {"group_width": 8}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (0, "towers must be an int >= 1, 'regular' or 'depthwise', got 0"),
        ("dense", "towers must be an int >= 1, 'regular' or 'depthwise', got 'dense'"),
        ({"group_width": -2}, "group_width must be an int >= 1, got -2"),
        ({"position": 1.5}, "position must be a number in [0, 1], got 1.5"),
        (
            {"width": 2},
            "a tower spec mapping has one key of towers, group_width, position, got {'width': 2}",
        ),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError) as err:
        TowerSpec.parse(spec)
    assert str(err.value) == message


def test_snapping_on_a_log_scale():
    # divisors of 728: 1 2 4 7 8 13 14 26 28 52 56 91 104 182 364 728
    assert realize(TowerSpec("towers", 3), 728) == 4  # Inception's 3 towers snap to 4
    assert realize(TowerSpec("towers", 16), 728) == 14
    assert realize(TowerSpec("towers", 1000), 728) == 728
    assert realize(TowerSpec("group_width", 3), 128) == 32  # 128/3 ≈ 42.7 → 32 (log-nearest)
    assert realize(TowerSpec("position", 0.0), 728) == 1
    assert realize(TowerSpec("position", 1.0), 728) == 728
    assert realize(TowerSpec("position", 0.5), 64) == 8
    assert nearest_divisor(12, 5) == 6  # log-distance: ln 6 - ln 5 = 0.18 < ln 5 - ln 4 = 0.22
    assert nearest_divisor(12, 4.8) == 4  # the boundary is the geometric mean, sqrt(24) = 4.9
    assert position(8, 64) == pytest.approx(0.5)
    assert position(1, 1) == 0.0


def test_strict_mode_raises_with_the_site_and_valid_counts():
    with pytest.raises(ValueError) as err:
        realize(TowerSpec("towers", 3), 728, "strict", "entry.block4.convs.0")
    assert str(err.value) == (
        "entry.block4.convs.0: towers=3 does not divide 728 channels; "
        "valid: 1, 2, 4, 7, 8, 13, 14, 26, 28, 52, 56, 91, 104, 182, 364, 728"
    )
    with pytest.raises(ValueError, match="group_width=5 does not divide 64 channels"):
        realize(TowerSpec("group_width", 5), 64, "strict")


def test_overrides_by_flow_and_layer_longest_prefix_wins():
    schedule = TowerSchedule.build(
        "depthwise", {"middle": 8, "middle.block6": 2, "exit.block14.convs.1": "regular"}
    )
    model = xception(width=0.25, middle_blocks=2, stem="small", num_classes=10, towers=schedule)
    towers = {name: r["towers"] for name, r in realized_towers(model).items()}
    assert towers["entry.block2.convs.0"] == 16  # default: depthwise over its 16 input channels
    assert towers["middle.block5.convs.0"] == 8
    assert towers["middle.block6.convs.2"] == 2
    assert towers["exit.block14.convs.0"] == 256
    assert towers["exit.block14.convs.1"] == 1
    assert len(towers) == 2 * 3 + 2 * 3 + 2 + 2


def test_override_naming_no_site_is_an_error():
    with pytest.raises(ValueError, match="tower override 'midle' matches no tower site"):
        xception(width=0.25, middle_blocks=1, stem="small", overrides={"midle": 4})


def test_strict_schedule_names_the_first_site_that_cannot_take_it():
    with pytest.raises(
        ValueError,
        match=r"^entry.block4.convs.1: towers=16 does not divide 184 channels; valid: 1, 2, 4, 8,",
    ):
        xception(width=0.25, middle_blocks=1, stem="small", towers=16, snap="strict")


def test_realized_towers_report():
    model = xception(width=0.25, middle_blocks=1, stem="small", towers={"group_width": 8})
    report = realized_towers(model)
    row = report["middle.block5.convs.1"]
    assert row == {
        "channels": 184,
        "towers": 23,
        "group_width": 8,
        "position": pytest.approx(0.601, abs=1e-3),
        "regime": "inception",
    }


def test_layer_seed_draws_per_site_and_is_reproducible():
    kw = {"width": 0.25, "middle_blocks": 2, "stem": "small"}
    a = realized_towers(xception(layer_seed=1, **kw))
    b = realized_towers(xception(layer_seed=1, **kw))
    c = realized_towers(xception(layer_seed=2, **kw))
    assert a == b and a != c
    assert len({r["towers"] for r in a.values()}) > 3  # layers really differ


def test_labels_are_made_read_back_and_ordered_from_regular_to_depthwise():
    assert tower_label(4) == "4" and tower_label({"group_width": 8}) == "gw8"
    assert tower_label("depthwise", 3, {"entry": 2, "exit": "depthwise"}) == (
        "random/3 [entry=2, exit=depthwise]"
    )
    label = TowerLabel.parse("random/3 [entry=2, exit=depthwise]")
    assert (label.head, label.overrides, label.sampled) == (
        "random/3",
        "entry=2, exit=depthwise",
        True,
    )
    assert label.population() == "sampled models [entry=2, exit=depthwise]"
    assert str(label) == "random/3 [entry=2, exit=depthwise]"
    assert not TowerLabel.parse("random/x").sampled and TowerLabel.parse("8").population() == "8"
    shuffled = ["depthwise", "16", "2", "1", "random/10", "gw8", "t=0.50", "4 [entry=2]", "4",
                "random/3", "regular", "gw64", "t=0.25"]  # fmt: skip
    assert label_order(shuffled) == [
        "1", "regular", "2", "4", "4 [entry=2]", "16", "depthwise", "gw64", "gw8", "t=0.25",
        "t=0.50", "random/3", "random/10",
    ]  # fmt: skip


def test_statuses_are_their_text():
    assert (
        Status.ERROR == "error"
        and json.dumps({"status": Status.FINISHED}) == '{"status": "finished"}'
    )
    assert [str(s) for s in Status] == ["running", "finished", "stopped", "diverged", "error"]
    assert set(FAILED) == {"error", "diverged"}
