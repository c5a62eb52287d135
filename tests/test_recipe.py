"""The demo's recipe converges: the shipped run of the demo (examples/digits_continuum/) used the
experiment file's recipe, and every point's learning curve is flat at its end."""

import json
from pathlib import Path

from towerspace import config, results

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "digits_continuum"
FLAT = 0.01  # 3.6 of digits' 359 validation images


def test_the_shipped_demo_ran_the_experiment_files_recipe():
    expected = config.to_dict(config.load_experiment(REPO / "experiments/digits_continuum.yaml"))
    table = results.load(DEMO)
    assert [json.loads(c)["train"] for c in table["config"]] == [expected["train"]] * len(table)
    assert (table["epochs_run"] == expected["train"]["epochs"]).all()


def test_every_point_of_the_demo_is_flat_at_its_end():
    history = results.load_history(DEMO)
    curves = history.pivot_table(index="epoch", columns="towers", values="val_acc",
                                 aggfunc="mean", observed=True)  # fmt: skip
    for towers, curve in curves.items():
        last = curve.iloc[-3:]
        assert last.max() - last.min() <= FLAT, (towers, curve.round(4).tolist())
        assert curve.iloc[-1] >= curve.max() - FLAT, (towers, curve.round(4).tolist())
