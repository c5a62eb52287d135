"""The ImageNet-style data path on a small generated ImageFolder tree, streamed for real."""

from pathlib import Path

import pytest
import torch

from towerspace import data as datasets
from towerspace.data import DataConfig, LoaderBatches

REPO = Path(__file__).resolve().parent.parent
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 8, 3


def write_tree(root: Path) -> Path:
    """train/ and val/ of CLASSES class folders: JPEGs and PNGs of varied sizes, with PIL."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = 40 + 4 * i, 56 - 3 * i
                pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
                pixels[..., c] = 255  # each class has its own dominant channel
                suffix = "jpg" if i % 2 else "png"
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.{suffix}")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("imagefolder"))


def _stream(tree: Path, workers: int = 1) -> datasets.DataBundle:
    cfg = DataConfig(name="imagefolder", root=str(tree), image_size=32, stream="always")
    return datasets.load(cfg, num_workers=workers)


def test_streamed_batches_have_shapes_labels_and_normalised_pixels(tree):
    bundle = _stream(tree)
    assert isinstance(bundle.train, LoaderBatches) and isinstance(bundle.val, LoaderBatches)
    assert (len(bundle.train), len(bundle.val)) == (
        CLASSES * TRAIN_PER_CLASS,
        CLASSES * VAL_PER_CLASS,
    )
    assert (bundle.num_classes, bundle.in_chans, bundle.image_size) == (CLASSES, 3, 32)
    x, y = next(bundle.val.batches(5, shuffle=False))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 0, 1, 1]  # ImageFolder order: class folders sorted
    assert x.min() >= -1.0 and x.max() <= 1.0  # [-1, 1], as Keras' Xception scales pixels
    # the dominant channel of each class survives the crop: an image, not noise, arrived
    assert torch.equal(x.mean(dim=(2, 3)).argmax(1), y)


def test_train_is_augmented_and_validation_deterministic(tree):
    bundle = _stream(tree)
    val = [torch.cat([x for x, _ in bundle.val.batches(4, shuffle=False)]) for _ in range(2)]
    assert torch.equal(val[0], val[1])
    first, second = (next(bundle.train.batches(6, shuffle=False, train=True)) for _ in range(2))
    assert torch.equal(first[1], second[1])  # the same images, in the same order
    assert not torch.equal(first[0], second[0])  # with other random crops and flips


def test_streamed_loaders_keep_their_workers_across_epochs(tree):
    bundle = _stream(tree)
    g = torch.Generator().manual_seed(0)
    epochs = [[y for _, y in bundle.train.batches(8, shuffle=True, generator=g)] for _ in range(2)]
    assert len(bundle.train.loaders) == 1  # one DataLoader: its workers persist
    loader = next(iter(bundle.train.loaders.values()))
    assert loader.persistent_workers and loader.num_workers == 1
    assert loader.prefetch_factor == datasets.PREFETCH
    assert [len(y) for y in epochs[0]] == [8, 8, 8]
    assert (
        torch.cat(epochs[0]).sort().values.tolist() == torch.cat(epochs[1]).sort().values.tolist()
    )
    assert not all(torch.equal(a, b) for a, b in zip(*epochs, strict=True))  # reshuffled
    next(bundle.train.batches(8, shuffle=True, generator=g))  # an epoch cut short (max_steps)
    after = [y for _, y in bundle.train.batches(8, shuffle=True, generator=g)]
    assert sorted(torch.cat(after).tolist()) == sorted(torch.cat(epochs[0]).tolist())


def test_worker_count_comes_from_the_trials_cpus(tree, tmp_path):
    assert [datasets.loader_workers(c) for c in (0.5, 1, 2, 3, 8)] == [1, 1, 1, 2, 7]
    from towerspace import config
    from towerspace.trial import Trial

    sets = [f"data.root={tree}", "data.name=imagefolder", "data.image_size=32",
            "data.stream=always", "resources.cpus=3", "model.width=0.125",
            "model.middle_blocks=1"]  # fmt: skip
    cfg = config.load_experiment(REPO / "experiments/imagenet_xception.yaml", sets)
    trial = Trial(cfg, seed=0, trial_id="t", point={}, record_path=tmp_path / "t.json")
    assert trial.data.train.num_workers == 2


def test_loader_throughput_is_measured_per_worker(tree):
    bundle = _stream(tree, workers=2)
    speed = datasets.loader_throughput(bundle.train, batch_size=4, num_batches=3)
    assert speed["workers"] == 2 and speed["images_per_s"] > 0
    assert speed["images_per_s_per_worker"] == pytest.approx(speed["images_per_s"] / 2)


def test_small_trees_still_decode_once_into_tensors(tree):
    bundle = datasets.load(DataConfig(name="imagefolder", root=str(tree), image_size=32),
                           num_workers=0)  # fmt: skip
    assert isinstance(bundle.train, datasets.TensorBatches)
    assert bundle.train.images.dtype == torch.uint8 and len(bundle.train) == 24


def test_sizes_count_files_without_decoding(tree, tmp_path):
    cfg = DataConfig(name="imagefolder", root=str(tree), image_size=32)
    assert datasets.sizes(cfg) == datasets.DataSizes(24, 9, 3, 3, 32)
    flat = DataConfig(name="imagefolder", root=str(tree / "train"), image_size=32,
                      val_fraction=0.25)  # fmt: skip
    assert datasets.sizes(flat) == datasets.DataSizes(18, 6, 3, 3, 32)  # 2 of 8 per class held out
    loaded = datasets.load(flat, num_workers=0)
    assert (len(loaded.train), len(loaded.val)) == (18, 6)


@pytest.mark.slow
def test_imagenet_smoke_sweep_streams_a_real_tree(tree, tmp_path, local_ray, capsys):
    from towerspace import results
    from towerspace.cli import main

    code = main(["sweep", str(REPO / "experiments/imagenet_xception.yaml"), "--smoke",
                 "--set", "data.name=imagefolder", "--set", f"data.root={tree}",
                 "--set", "data.image_size=32", "--set", "data.stream=always",
                 "--storage", str(tmp_path)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    table = results.load(tmp_path / "imagenet_xception")
    assert sorted(table["towers"]) == ["1", "depthwise"]
    assert (table["status"] == "finished").all() and (table["data"] == "imagefolder").all()
    assert "imagenet_xception: estimate: 2 trials" in capsys.readouterr().out
