"""Data sets behind one interface; small ones live on the device and augment in batches."""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data.distributed import DistributedSampler

from towerspace.errors import DataError
from towerspace.parallel import shard

if TYPE_CHECKING:
    from torchvision.transforms.v2 import Compose

NAMES = ("digits", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
AUGMENTS = ("auto", "none", "crop", "crop_flip")
STREAMS = ("auto", "always", "never")
EXACT_SIZES_BYTES = 2**28  # synthetic data up to this size is loaded to count its split exactly
TENSOR_LIMIT = 20_000  # image folders up to this many images are decoded once and held as tensors
PREFETCH = 4  # batches each DataLoader worker keeps ready (torch's default is 2)
CROP_FRACTION = 0.875  # validation: centre crop of this fraction (TF-slim Inception, 299 of 342)
# Keras' Xception scales pixels to [-1, 1] ("tf" mode): mean 0.5 and std 0.5 per channel
STREAM_MEAN, STREAM_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# data sets of known size (the torchvision train and test splits): train, val, classes, channels, px
DIGITS_CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)  # sklearn's digits
KNOWN_SIZES = {
    "mnist": (60_000, 10_000, 10, 1, 28),
    "cifar10": (50_000, 10_000, 10, 3, 32),
    "cifar100": (50_000, 10_000, 100, 3, 32),
}
# what each data set needs on disk, for the error that says how to get it
EXPECTED = {
    "mnist": "MNIST/raw/",
    "cifar10": "cifar-10-batches-py/",
    "cifar100": "cifar-100-python/",
    "imagefolder": "one folder per class (or train/ and val/ holding them)",
}


@dataclass(frozen=True)
class DataConfig:
    """Which data set a trial trains on, and how it is split and augmented."""

    name: str = field(default="digits", metadata={"choices": NAMES})  # digits: no download
    root: str | None = None  # folder holding the files (mnist, cifar, imagefolder)
    image_size: int | None = field(default=None, metadata={"min": 4})  # None: native size
    download: bool = False  # let torchvision download into root (only when asked)
    val_fraction: float = field(default=0.2, metadata={"gt": 0.0, "max": 0.9})  # held out
    augment: str = field(default="auto", metadata={"choices": AUGMENTS})  # auto: per data set
    num_samples: int = field(default=512, metadata={"min": 8})  # synthetic: images
    channels: int = field(default=3, metadata={"min": 1})  # synthetic: channels
    num_classes: int = field(default=10, metadata={"min": 2})  # synthetic: classes
    split_seed: int = 0  # the train/val split, the same for every trial of a sweep
    # imagefolder: always streams through DataLoader workers; never decodes once into tensors;
    # auto streams trees of more than TENSOR_LIMIT images
    stream: str = field(default="auto", metadata={"choices": STREAMS})


@dataclass(frozen=True)
class DataSizes:
    """What a data set holds, counted without decoding: split sizes and the model's input."""

    train_images: int
    val_images: int
    num_classes: int
    in_chans: int
    image_size: int


class TensorBatches:
    """Images held as one tensor (on the trial's device), batched and augmented on the device."""

    def __init__(self, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, augment: str):
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.augment = augment
        self.pad = max(1, images.shape[-1] // 8)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> TensorBatches:
        """The same images on another device."""
        moved = [t.to(device) for t in (self.images, self.labels, self.mean, self.std)]
        return TensorBatches(*moved, self.augment)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        train: bool = False,
        drop_last: bool = False,
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) batches, normalised, augmented when train is set.

        part=(rank, workers): this data-parallel worker's part of each global batch. Every
        worker draws the same global batch and augmentation (one generator state), so the
        parts together are exactly what one worker would see.
        """
        rank, workers = part
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.labels.device)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            if len(index) < workers:  # a last batch too small to give every worker a part
                break
            x = self.images[index].float()
            if self.images.dtype == torch.uint8:
                x = x / 255.0
            if train and self.augment != "none":
                x = self._augment(x, generator)
            x = (x - self.mean) / self.std
            yield shard(x, rank, workers), shard(self.labels[index], rank, workers)

    def _augment(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Random crops of the zero-padded batch, and flips, drawn for all images at once."""
        n, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
        if self.augment == "crop_flip":
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


class LoaderBatches:
    """A streaming data set (large image folders) behind the same batches() interface.

    DataLoader workers decode and augment to uint8; batches are moved to the trial's device
    and normalised there, so the host does no float work. Workers persist across epochs.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        num_workers: int,
        device: torch.device,
        mean: tuple[float, ...] = STREAM_MEAN,
        std: tuple[float, ...] = STREAM_STD,
    ) -> None:
        self.dataset, self.num_workers, self.device = dataset, num_workers, device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.loaders: dict[tuple, torch.utils.data.DataLoader] = {}
        self.passes: dict[tuple, int] = {}  # per loader: its sampler's epoch (data-parallel)

    def __len__(self) -> int:
        return len(self.dataset)

    def loader(
        self,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None,
        drop_last: bool,
        part: tuple[int, int] = (0, 1),
    ) -> torch.utils.data.DataLoader:
        """The DataLoader for one way of batching, kept so that its workers persist.

        A data-parallel worker (part=(rank, workers)) loads only its own images: a
        DistributedSampler gives it 1/workers of every epoch, batch_size/workers at a time
        (padded by at most workers-1 repeated images so every worker takes as many steps).
        """
        key = (batch_size, shuffle, id(generator), drop_last, part)  # generator is held: ids stay
        if key not in self.loaders:
            workers = self.num_workers
            rank, replicas = part
            sampler = None
            if replicas > 1:
                sampler = DistributedSampler(self.dataset, replicas, rank, shuffle=shuffle,
                                             drop_last=drop_last)  # fmt: skip
                batch_size, shuffle, generator = batch_size // replicas, False, None
            self.loaders[key] = torch.utils.data.DataLoader(
                self.dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
                drop_last=drop_last, persistent_workers=workers > 0,
                prefetch_factor=PREFETCH if workers else None,
            )  # fmt: skip
        loader = self.loaders[key]
        if isinstance(loader.sampler, DistributedSampler):  # a new shuffle every pass
            self.passes[key] = self.passes.get(key, -1) + 1
            loader.sampler.set_epoch(self.passes[key])
        return loader

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        train: bool = False,
        drop_last: bool = False,
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) batches on the device, normalised (augmentation is in the dataset);
        part=(rank, workers): this data-parallel worker's share (see loader())."""
        for x, y in self.loader(batch_size, shuffle, generator, drop_last, part):
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            yield x.sub_(self.mean).div_(self.std), y.to(self.device, non_blocking=True)


Batches = TensorBatches | LoaderBatches


@dataclass
class DataBundle:
    """A data set's train and validation batches and the shape a model needs."""

    name: str
    train: Batches
    val: Batches
    num_classes: int
    in_chans: int
    image_size: int


def loader_workers(cpus: float) -> int:
    """DataLoader workers for a trial of this many CPUs: all but the training loop's, at least 1."""
    return max(1, math.ceil(cpus) - 1)


def loader_throughput(batches: LoaderBatches, batch_size: int, num_batches: int = 8) -> dict:
    """Images per second the data path alone delivers (decode, augment, copy, normalise).

    Timed after a first batch, which starts the workers; train=True, as in an epoch.
    """
    stream = batches.batches(batch_size, shuffle=True, train=True, drop_last=True)
    next(stream, None)
    seen, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(stream):
        seen += len(x)
        if i + 1 == num_batches:
            break
    if batches.device.type == "cuda":
        torch.cuda.synchronize(batches.device)
    per_s = seen / max(time.perf_counter() - start, 1e-9)
    if not seen:
        raise ValueError(f"loader_throughput: the split holds fewer than 2 batches of {batch_size}")
    workers = batches.num_workers
    return {"workers": workers, "images_per_s": per_s,
            "images_per_s_per_worker": per_s / max(workers, 1)}  # fmt: skip


def load(cfg: DataConfig, device: torch.device | str = "cpu", num_workers: int = 2) -> DataBundle:
    """Load a data set as a DataBundle; small sets are moved to the device once."""
    loaders = {"digits": _digits, "synthetic": _synthetic, "imagefolder": _imagefolder}
    if cfg.name not in NAMES:
        raise DataError(f"data.name: {cfg.name!r} is not one of: {', '.join(NAMES)}")
    bundle = loaders.get(cfg.name, _torchvision)(cfg, num_workers, torch.device(device))
    if isinstance(bundle.train, TensorBatches):
        bundle.train, bundle.val = bundle.train.to(device), bundle.val.to(device)
    return bundle


def _augment(cfg: DataConfig) -> str:
    if cfg.augment != "auto":
        return cfg.augment
    return {"digits": "crop", "mnist": "crop", "synthetic": "none"}.get(cfg.name, "crop_flip")


def _resize(images: Tensor, size: int | None) -> Tensor:
    if size is None or images.shape[-1] == size:
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)  # fmt: skip
    return resized.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else resized


def _split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A stratified train/val split: the same fraction of every class held out."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(len(idx) * val_fraction))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _from_tensors(cfg: DataConfig, images: Tensor, labels: Tensor, classes: int) -> DataBundle:
    """Split, normalise by train statistics, and wrap tensor-resident images."""
    images = _resize(images, cfg.image_size)
    train, val = _split(labels, cfg.val_fraction, cfg.split_seed)
    return _bundle(cfg, images[train], labels[train], images[val], labels[val], classes)


def _bundle(cfg, x_train, y_train, x_val, y_val, classes: int) -> DataBundle:
    scale = 255.0 if x_train.dtype == torch.uint8 else 1.0
    stats = x_train.float().transpose(0, 1).flatten(1) / scale
    mean, std = stats.mean(1), stats.std(1).clamp_min(1e-6)
    augment = _augment(cfg)
    return DataBundle(
        cfg.name,
        TensorBatches(x_train, y_train.long(), mean, std, augment),
        TensorBatches(x_val, y_val.long(), mean, std, "none"),
        classes,
        x_train.shape[1],
        x_train.shape[-1],
    )


def _digits(cfg: DataConfig, num_workers: int, device: torch.device) -> DataBundle:
    images, labels = _digits_arrays()
    images = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _from_tensors(cfg, images, torch.tensor(labels), 10)


def _digits_arrays():
    """scikit-learn's bundled digits as (images, labels), read from the CSV file it ships, as
    its load_digits does: importing sklearn (and scipy) takes seconds, reading the file 0.03 s."""
    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():  # another layout: sklearn's own loader
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _synthetic(cfg: DataConfig, num_workers: int, device: torch.device) -> DataBundle:
    g = torch.Generator().manual_seed(cfg.split_seed)
    size = cfg.image_size or 16
    images = torch.rand(cfg.num_samples, cfg.channels, size, size, generator=g)
    labels = torch.randint(0, cfg.num_classes, (cfg.num_samples,), generator=g)
    return _from_tensors(cfg, images, labels, cfg.num_classes)


def _root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise DataError(f"data.root: {cfg.name} needs a folder; set data.root (expected "
                        f"{EXPECTED[cfg.name]} inside it)")  # fmt: skip
    root = Path(cfg.root).expanduser()
    if not root.is_dir() and not cfg.download:
        raise DataError(f"data.root: {str(root)!r} is not a folder; point data.root at a copy "
                        f"of {cfg.name} ({EXPECTED[cfg.name]})")  # fmt: skip
    return root


def _torchvision(cfg: DataConfig, num_workers: int, device: torch.device) -> DataBundle:
    import torchvision

    root = _root(cfg)
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10,
           "cifar100": torchvision.datasets.CIFAR100}[cfg.name]  # fmt: skip
    try:
        splits = [cls(str(root), train=t, download=cfg.download) for t in (True, False)]
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted..."
        raise DataError(
            f"data.root: no {cfg.name} files under {str(root)!r} (expected "
            f"{EXPECTED[cfg.name]}); pass --set data.download=true to download, or point "
            f"data.root at a copy"
        ) from err
    tensors = []
    for split in splits:
        x = torch.as_tensor(split.data)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # MNIST NHW, CIFAR NHWC
        tensors += [_resize(x.contiguous(), cfg.image_size), torch.as_tensor(split.targets)]
    return _bundle(cfg, *tensors, len(splits[0].classes))


def _imagefolder(cfg: DataConfig, num_workers: int, device: torch.device) -> DataBundle:
    import torchvision

    root = _root(cfg)
    if cfg.image_size is None:
        raise DataError("data.image_size: imagefolder needs an image size (e.g. 224 or 299)")
    val_tf = val_transform(cfg.image_size)
    split_dirs = (root / "train", root / "val")
    try:
        if all(d.is_dir() for d in split_dirs):
            parts = [
                torchvision.datasets.ImageFolder(str(d), val_tf, loader=open_image)
                for d in split_dirs
            ]
        else:
            parts = [torchvision.datasets.ImageFolder(str(root), val_tf, loader=open_image)]
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"data.root: no class folders of images under {str(root)!r} "
                        f"({err})") from None  # fmt: skip
    total = sum(len(p) for p in parts)
    if cfg.stream == "always" or (cfg.stream == "auto" and total > TENSOR_LIMIT):
        return _stream_imagefolder(cfg, parts, num_workers, device)
    stacked = [_decode_all(p, num_workers) for p in parts]
    classes = len(parts[0].classes)
    if len(stacked) == 2:
        return _bundle(cfg, *stacked[0], *stacked[1], classes)
    return _from_tensors(cfg, *stacked[0], classes)


def open_image(path: str):
    """An image file as RGB (ImageFolder's loader), or a DataError that names the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL: truncated, corrupt, not an image
        raise DataError(f"{path}: cannot decode this image ({type(err).__name__}: {err})") from None


def _decode_all(dataset, num_workers: int) -> tuple[Tensor, Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def stream_transforms(size: int) -> tuple:
    """(train, val) transforms to uint8: Inception-style random-resized crop and flip; the
    validation crop. Normalisation happens on the device (LoaderBatches)."""
    from torchvision.transforms import v2

    train = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True),
                        v2.RandomHorizontalFlip(),
                        v2.ToDtype(torch.uint8, scale=True)])  # fmt: skip
    return train, val_transform(size)


def val_transform(size: int) -> Compose:
    """Validation images to uint8: resized, then centre-cropped to size (CROP_FRACTION)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize(round(size / CROP_FRACTION), antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.uint8, scale=True)])  # fmt: skip


def _stream_imagefolder(cfg, parts, num_workers: int, device: torch.device) -> DataBundle:
    """ImageNet-scale trees: decode and augment in DataLoader workers, normalise on the device."""
    from torchvision.datasets import ImageFolder

    train_tf, val_tf = stream_transforms(cfg.image_size)
    if len(parts) == 2:
        train = ImageFolder(parts[0].root, train_tf, loader=open_image)
        val = ImageFolder(parts[1].root, val_tf, loader=open_image)
    else:
        labels = torch.tensor(parts[0].targets)
        train_idx, val_idx = _split(labels, cfg.val_fraction, cfg.split_seed)
        train = torch.utils.data.Subset(
            ImageFolder(parts[0].root, train_tf, loader=open_image), train_idx
        )
        val = torch.utils.data.Subset(
            ImageFolder(parts[0].root, val_tf, loader=open_image), val_idx
        )
    return DataBundle(
        cfg.name,
        LoaderBatches(train, num_workers=num_workers, device=device),
        LoaderBatches(val, num_workers=num_workers, device=device),
        len(parts[0].classes),
        3,
        cfg.image_size,
    )


# ---------------------------------------------------------------- sizes without decoding


def split_sizes(class_counts: list[int], val_fraction: float) -> tuple[int, int]:
    """(train, val) images of a stratified split, as _split() makes it."""
    val = sum(max(1, round(n * val_fraction)) for n in class_counts)
    return sum(class_counts) - val, val


def _count_images(folder: Path) -> list[int]:
    """Images per class folder, by file name (as ImageFolder finds them), without decoding;
    a class folder without images is refused (ImageFolder would fail in every trial)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(e.path for e in os.scandir(folder) if e.is_dir())
    counts = []
    for path in classes:
        files = (f for _, _, names in os.walk(path, followlinks=True) for f in names)
        counts.append(sum(f.lower().endswith(IMG_EXTENSIONS) for f in files))
        if counts and not counts[-1] and len(classes) > 1:
            raise DataError(f"data.root: class folder {path!r} holds no images (allowed: every "
                            f"class folder holds at least one {', '.join(IMG_EXTENSIONS[:3])}... "
                            f"file); remove it or add its images")  # fmt: skip
    return counts


def resident_bytes(cfg: DataConfig) -> int:
    """Bytes of images a trial holds in memory (0 for image folders streamed from disk)."""
    if cfg.name == "digits":
        return 1797 * (cfg.image_size or 8) ** 2 * 4  # float32
    if cfg.name == "synthetic":
        return cfg.num_samples * cfg.channels * (cfg.image_size or 16) ** 2 * 4
    if cfg.name in KNOWN_SIZES:
        train, val, _, chans, native = KNOWN_SIZES[cfg.name]
        return (train + val) * chans * (cfg.image_size or native) ** 2  # uint8
    if cfg.name != "imagefolder" or cfg.root is None or not Path(cfg.root).is_dir():
        return 0
    found = _imagefolder_sizes(cfg)
    total = found.train_images + found.val_images
    streamed = cfg.stream == "always" or (cfg.stream == "auto" and total > TENSOR_LIMIT)
    return 0 if streamed else total * 3 * found.image_size**2  # uint8


def _imagefolder_sizes(cfg: DataConfig) -> DataSizes:
    root = _root(cfg)
    if cfg.image_size is None:
        raise DataError("data.image_size: imagefolder needs an image size (e.g. 224 or 299)")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = _count_images(root / "train"), _count_images(root / "val")
        counts = (sum(train), sum(val))
    else:
        train = _count_images(root)
        counts = split_sizes(train, cfg.val_fraction)
    if not sum(train):
        raise DataError(f"data.root: no class folders of images under {str(root)!r}")
    return DataSizes(*counts, len(train), 3, cfg.image_size)


def sizes(cfg: DataConfig) -> DataSizes:
    """Split sizes, classes, channels and image size of a data set, without decoding images."""
    if cfg.name in KNOWN_SIZES:
        train, val, classes, chans, native = KNOWN_SIZES[cfg.name]
        return DataSizes(train, val, classes, chans, cfg.image_size or native)
    if cfg.name == "imagefolder":
        return _imagefolder_sizes(cfg)
    if cfg.name == "digits":
        train, val = split_sizes(list(DIGITS_CLASS_COUNTS), cfg.val_fraction)
        return DataSizes(train, val, 10, 1, cfg.image_size or 8)
    if cfg.name == "synthetic" and resident_bytes(cfg) > EXACT_SIZES_BYTES:  # not loaded
        train, val = split_sizes([cfg.num_samples], cfg.val_fraction)
        return DataSizes(train, val, cfg.num_classes, cfg.channels, cfg.image_size or 16)
    bundle = load(cfg, num_workers=0)  # digits and synthetic: small, in memory, exact
    return DataSizes(len(bundle.train), len(bundle.val), bundle.num_classes, bundle.in_chans,
                     bundle.image_size)  # fmt: skip
