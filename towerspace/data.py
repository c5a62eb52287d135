"""Data sets behind one interface; small ones live on the device and augment in batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

NAMES = ("digits", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
AUGMENTS = ("auto", "none", "crop", "crop_flip")
TENSOR_LIMIT = 20_000  # image folders up to this many images are decoded once and held as tensors
# what each data set needs on disk, for the error that says how to get it
EXPECTED = {
    "mnist": "MNIST/raw/",
    "cifar10": "cifar-10-batches-py/",
    "cifar100": "cifar-100-python/",
    "imagefolder": "one folder per class (or train/ and val/ holding them)",
}


class DataError(ValueError):
    """A data set that cannot be loaded; the message says which, where, and how to fix it."""


@dataclass(frozen=True)
class DataConfig:
    """Which data set a trial trains on, and how it is split and augmented."""

    name: str = field(default="digits", metadata={"choices": NAMES})
    root: str | None = None  # folder holding the files (mnist, cifar, imagefolder)
    image_size: int | None = field(default=None, metadata={"min": 4})  # None: native size
    download: bool = False  # let torchvision download into root (only when asked)
    val_fraction: float = field(default=0.2, metadata={"gt": 0.0, "max": 0.9})  # held out
    augment: str = field(default="auto", metadata={"choices": AUGMENTS})  # auto: per data set
    num_samples: int = field(default=512, metadata={"min": 8})  # synthetic: images
    channels: int = field(default=3, metadata={"min": 1})  # synthetic: channels
    num_classes: int = field(default=10, metadata={"min": 2})  # synthetic: classes
    split_seed: int = 0  # the train/val split, the same for every trial of a sweep


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
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) batches, normalised, augmented when train is set."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.labels.device)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            x = self.images[index].float()
            if self.images.dtype == torch.uint8:
                x = x / 255.0
            if train and self.augment != "none":
                x = self._augment(x, generator)
            yield (x - self.mean) / self.std, self.labels[index]

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
    """A streaming data set (large image folders) behind the same batches() interface."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_workers: int, pin_memory: bool):
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        train: bool = False,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) batches from DataLoader workers (augmentation is in the dataset)."""
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=drop_last,
            persistent_workers=False,
        )  # fmt: skip
        yield from loader


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
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return _from_tensors(cfg, images, torch.tensor(digits.target), 10)


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
    from torchvision.transforms import v2

    root = _root(cfg)
    if cfg.image_size is None:
        raise DataError("data.image_size: imagefolder needs an image size (e.g. 224 or 299)")
    size = cfg.image_size
    val_tf = v2.Compose([v2.ToImage(), v2.Resize(int(size * 1.14)), v2.CenterCrop(size),
                         v2.ToDtype(torch.uint8, scale=True)])  # fmt: skip
    split_dirs = (root / "train", root / "val")
    try:
        if all(d.is_dir() for d in split_dirs):
            parts = [torchvision.datasets.ImageFolder(str(d), transform=val_tf) for d in split_dirs]
        else:
            parts = [torchvision.datasets.ImageFolder(str(root), transform=val_tf)]
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"data.root: no class folders of images under {str(root)!r} "
                        f"({err})") from None  # fmt: skip
    total = sum(len(p) for p in parts)
    if total > TENSOR_LIMIT:
        return _stream_imagefolder(cfg, parts, num_workers, device)
    stacked = [_decode_all(p, num_workers) for p in parts]
    classes = len(parts[0].classes)
    if len(stacked) == 2:
        return _bundle(cfg, *stacked[0], *stacked[1], classes)
    return _from_tensors(cfg, *stacked[0], classes)


def _decode_all(dataset, num_workers: int) -> tuple[Tensor, Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _stream_imagefolder(cfg, parts, num_workers: int, device: torch.device) -> DataBundle:
    """ImageNet-scale trees: decode in DataLoader workers, random-resized-crop and flip."""
    import torchvision
    from torchvision.transforms import v2

    size = cfg.image_size
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet statistics
    train_tf = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True),
                           v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(mean, std)])  # fmt: skip
    val_tf = v2.Compose([v2.ToImage(), v2.Resize(int(size * 1.14)), v2.CenterCrop(size),
                         v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(mean, std)])  # fmt: skip
    if len(parts) == 2:
        train = torchvision.datasets.ImageFolder(parts[0].root, transform=train_tf)
        val = torchvision.datasets.ImageFolder(parts[1].root, transform=val_tf)
    else:
        labels = torch.tensor(parts[0].targets)
        train_idx, val_idx = _split(labels, cfg.val_fraction, cfg.split_seed)
        train = torch.utils.data.Subset(
            torchvision.datasets.ImageFolder(parts[0].root, transform=train_tf), train_idx
        )
        val = torch.utils.data.Subset(
            torchvision.datasets.ImageFolder(parts[0].root, transform=val_tf), val_idx
        )
    pin = device.type == "cuda"
    channels = 3
    return DataBundle(cfg.name, LoaderBatches(train, num_workers, pin),
                      LoaderBatches(val, num_workers, pin), len(parts[0].classes), channels,
                      size)  # fmt: skip
