"""Data sets: the embedded digits, real MNIST files, image folders, and on-device augmentation."""

import gzip
from pathlib import Path

import pytest
import torch

from towerspace.data import DataConfig, DataError, TensorBatches, load

MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist-t10k"


@pytest.fixture(scope="module")
def digits():
    return load(DataConfig(name="digits", image_size=16))


def test_digits_is_embedded_split_and_stratified(digits):
    assert (len(digits.train), len(digits.val)) == (1438, 359)  # 1,797 images, 20% held out
    assert (digits.in_chans, digits.image_size, digits.num_classes) == (1, 16, 10)
    val_counts = torch.bincount(digits.val.labels, minlength=10)
    assert val_counts.min() >= 35 and val_counts.max() <= 37  # ~20% of each class
    x, _ = next(digits.val.batches(len(digits.val), shuffle=False))
    assert x.shape == (359, 1, 16, 16) and abs(x.mean().item()) < 0.1
    assert digits.train.augment == "crop" and digits.val.augment == "none"


def test_digits_are_sklearns_read_without_importing_it(digits):
    """The CSV scikit-learn ships, read directly (importing sklearn takes seconds): the same
    images and labels as its load_digits, and sizes() agrees with the loaded split."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from towerspace.data import DataSizes, _digits_arrays, sizes

    images, labels = _digits_arrays()
    reference = load_digits()
    assert images.shape == (1797, 8, 8) and (images == reference.images).all()
    assert (labels == reference.target).all()
    for cfg in (
        DataConfig(name="digits", image_size=16),
        DataConfig(name="digits", val_fraction=0.5),
    ):
        bundle = load(cfg)
        expected = (len(bundle.train), len(bundle.val), bundle.num_classes, bundle.in_chans,
                    bundle.image_size)  # fmt: skip
        assert sizes(cfg) == DataSizes(*expected)
    code = ("import sys; from towerspace.data import DataConfig, load; "
            "load(DataConfig(name='digits')); print('sklearn' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_image_once_per_epoch_in_seeded_order(digits):
    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in digits.train.batches(100, shuffle=True, generator=g)])

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert len(a) == 1438 and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, digits.train.labels.sort().values)


def test_batched_crop_and_flip_are_reproducible_and_shape_preserving():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    ones = torch.ones(3)
    batches = TensorBatches(images, torch.tensor([0, 1]), torch.zeros(3), ones, "crop_flip")

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return next(batches.batches(2, shuffle=False, generator=g, train=True))[0]

    a, b = draw(3), draw(3)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    plain = next(batches.batches(2, shuffle=False, train=False))[0]
    assert torch.equal(plain, images)  # evaluation batches are never augmented
    assert any(not torch.equal(draw(s), images) for s in range(5))
    # every augmented row is a shifted (and maybe flipped) crop of the zero-padded original
    values = set(images.flatten().tolist()) | {0.0}
    assert set(a.flatten().tolist()) <= values


def test_uint8_images_scale_to_unit_range():
    images = torch.full((4, 1, 4, 4), 255, dtype=torch.uint8)
    batches = TensorBatches(images, torch.zeros(4, dtype=torch.long), torch.zeros(1),
                            torch.ones(1), "none")  # fmt: skip
    x, _ = next(batches.batches(4, shuffle=False))
    assert x.dtype == torch.float32 and torch.all(x == 1.0)


def test_synthetic_is_deterministic():
    a = load(DataConfig(name="synthetic", num_samples=40, channels=2, num_classes=3, image_size=8))
    b = load(DataConfig(name="synthetic", num_samples=40, channels=2, num_classes=3, image_size=8))
    assert torch.equal(a.train.images, b.train.images)
    assert (a.in_chans, a.num_classes, len(a.train) + len(a.val)) == (2, 3, 40)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DataConfig(name="cifar10", root=None),
         "data.root: cifar10 needs a folder; set data.root (expected cifar-10-batches-py/ "
         "inside it)"),
        (DataConfig(name="cifar10", root="/nonexistent/cifar"),
         "data.root: '/nonexistent/cifar' is not a folder; point data.root at a copy of cifar10 "
         "(cifar-10-batches-py/)"),
        (DataConfig(name="imagefolder", root="/tmp"),
         "data.image_size: imagefolder needs an image size (e.g. 224 or 299)"),
    ],
)  # fmt: skip
def test_missing_data_is_a_one_line_error(cfg, message):
    with pytest.raises(DataError) as err:
        load(cfg)
    assert str(err.value) == message


def test_empty_cifar_root_says_how_to_get_the_files(tmp_path):
    with pytest.raises(DataError) as err:
        load(DataConfig(name="cifar100", root=str(tmp_path)))
    assert str(err.value) == (
        f"data.root: no cifar100 files under '{tmp_path}' (expected cifar-100-python/); pass "
        f"--set data.download=true to download, or point data.root at a copy"
    )


@pytest.mark.skipif(not MNIST.is_dir(), reason="shared/data/mnist-t10k is not next to the repo")
def test_real_mnist_files_through_torchvision(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):  # only the test set ships here: serve it as both splits
        for kind in (
            "images-idx3",
            "labels-idx1",
        ):  # unpacked, as torchvision's download leaves them
            with gzip.open(MNIST / f"t10k-{kind}-ubyte.gz") as src:
                (raw / f"{split}-{kind}-ubyte").write_bytes(src.read())
    bundle = load(DataConfig(name="mnist", root=str(tmp_path)))
    assert (len(bundle.train), len(bundle.val)) == (10_000, 10_000)
    assert bundle.train.images.dtype == torch.uint8
    assert (bundle.in_chans, bundle.image_size, bundle.num_classes) == (1, 28, 10)
    counts = torch.bincount(bundle.val.labels).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _image_tree(root: Path, classes=3, per_class=6):
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            color = (40 * c, 10 * i, 200 - 30 * c)
            Image.new("RGB", (20 + i, 18), color).save(root / f"class{c}" / f"{i}.png")


def test_imagefolder_split_and_train_val_layouts(tmp_path):
    _image_tree(tmp_path / "flat")
    flat = load(DataConfig(name="imagefolder", root=str(tmp_path / "flat"), image_size=12,
                           val_fraction=0.34), num_workers=0)  # fmt: skip
    assert (len(flat.train), len(flat.val), flat.num_classes) == (12, 6, 3)
    assert flat.train.images.shape[1:] == (3, 12, 12) and flat.train.augment == "crop_flip"
    _image_tree(tmp_path / "split" / "train")
    _image_tree(tmp_path / "split" / "val", per_class=2)
    split = load(DataConfig(name="imagefolder", root=str(tmp_path / "split"), image_size=12),
                 num_workers=0)  # fmt: skip
    assert (len(split.train), len(split.val)) == (18, 6)
