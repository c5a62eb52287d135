"""Data-parallel training: N workers compute what one worker computes on the global batch."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from towerspace import config, results
from towerspace import data as datasets
from towerspace.models import xception
from towerspace.parallel import GlobalBatchNorm2d, shard, synchronise_batchnorm
from towerspace.sweep import run_sweep
from towerspace.sweep.state import TRAIN_RUNS
from towerspace.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parent.parent

# one step: later steps amplify float rounding (a 1e-7 nudge to the weights of this small net
# moves them by 4e-2 after 4 steps), so the exact comparison is of the first step
CFG = TrainConfig(epochs=1, batch_size=64, max_steps=1, lr=0.05, label_smoothing=0.1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return xception(width=0.125, middle_blocks=1, stem="small", num_classes=10, in_chans=1,
                    towers=4, input_size=16)  # fmt: skip


def _train(rank: int, world_size: int, init: str, out: dict) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    bundle = datasets.load(datasets.DataConfig(name="digits", image_size=16))
    trainer = Trainer(_model(), bundle, CFG, seed=0, rank=rank, world_size=world_size)
    history = list(trainer.epochs())
    if rank == 0:
        out["state"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        out["history"] = history
    if world_size > 1:
        dist.destroy_process_group()


def _worker(rank: int, world_size: int, init: str, path: str) -> None:
    out: dict = {}
    _train(rank, world_size, init, out)
    if rank == 0:
        torch.save(out, path)


@pytest.mark.slow  # a real process
def test_two_gloo_workers_train_as_one_worker_on_the_global_batch(tmp_path):
    single: dict = {}
    _train(0, 1, "", single)
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path / "out.pt")),
             nprocs=2)  # fmt: skip
    double = torch.load(tmp_path / "out.pt", weights_only=True)
    worst = max((single["state"][k].double() - double["state"][k].double()).abs().max().item()
                for k in single["state"] if single["state"][k].is_floating_point())  # fmt: skip
    assert worst < 1e-5  # measured: 5e-7 (float32 sums in another order)
    one, two = single["history"][0], double["history"][0]
    for key in ("train_loss", "val_loss", "val_acc", "val_top5"):
        assert abs(one[key] - two[key]) < 1e-5, key


def test_shards_cover_the_batch_once():
    batch = torch.arange(10)
    parts = [shard(batch, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat(parts), batch)
    assert shard(batch, 0, 1) is batch


def test_global_batchnorm_is_batchnorm_on_one_worker():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sequential(nn.BatchNorm2d(8)))
    swapped = synchronise_batchnorm(model, torch.device("cpu"))
    assert [type(m) for m in swapped.modules()].count(GlobalBatchNorm2d) == 2
    assert set(swapped.state_dict()) == {
        "0.weight",
        "0.bias",
        *(
            f"{p}.{k}"
            for p in ("1", "2.0")
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ),
    }


@pytest.mark.slow
def test_a_two_worker_trial_through_ray_train_matches_one_worker_and_survives_a_lost_worker(
    tiny_sweep, tmp_path
):
    # worker 0 raises at epoch 2, as a lost worker would: Ray Train restarts both workers
    fault = "faults={kind: raise, epoch: 2, times: 1, point: {}}"
    sets = ("train.epochs=2", "model.width=0.125", "model.middle_blocks=1", "seeds=[0]",
            "space.params={model.towers: {grid: [4]}}", "resources.workers=2", "retries=1",
            fault)  # fmt: skip
    cfg = config.load_experiment(REPO / "experiments/digits_continuum.yaml", sets)
    outcome = run_sweep(cfg, storage=tmp_path)
    assert outcome.statuses == {"finished": 1}
    two = results.load(outcome.results_path).iloc[0]
    one = results.load(tiny_sweep.results_path).query("towers == '4' and seed == 0").iloc[0]
    assert json.loads(two["config"])["resources"]["workers"] == 2
    assert two["params"] == one["params"] and two["epochs_run"] == 2
    record = json.loads((outcome.sweep_dir / "records" / f"{two['trial_id']}.json").read_text())
    assert record["resumed_at"] == [1]  # continued from its epoch-1 checkpoint, not from scratch
    history = results.load_history(outcome.history_path)
    assert list(history["epoch"]) == [1, 2]  # one row per epoch: nothing re-run
    reference = results.load_history(tiny_sweep.history_path).query("trial_id == @one.trial_id")
    # the same global batch of 128: the same first step to float rounding (test above), and
    # after the 11 steps of an epoch, rounding amplified by training (measured: 0.4% apart)
    assert history["train_loss"].iloc[0] == pytest.approx(reference["train_loss"].iloc[0], rel=0.03)
    # worker 0 checkpointed every epoch in the trial's Ray Train run, beside the records
    runs = list((outcome.sweep_dir / TRAIN_RUNS).iterdir())
    assert [r.name for r in runs] == [two["trial_id"]]
    assert len([p for p in runs[0].glob("checkpoint_*") if p.is_dir()]) == 1  # num_to_keep


def test_streamed_batches_give_each_worker_its_own_images():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    dataset = torch.utils.data.TensorDataset(images.contiguous(), torch.arange(10))
    stream = datasets.LoaderBatches(dataset, num_workers=0, device=torch.device("cpu"))
    epochs = []
    for _ in range(2):
        parts = [list(stream.batches(4, shuffle=True, train=True, part=(r, 2))) for r in (0, 1)]
        assert [len(y) for y in [b[1] for b in parts[0]]] == [2, 2, 1]  # 4 per step, 2 each
        seen = [int(v) for p in parts for _, y in p for v in y]
        assert sorted(seen) == list(range(10))  # disjoint, and every image once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new shuffle every pass
