"""Datasets as uint8 tensors, loaded once, normalised and augmented on the training device.

Two sources feed one in-memory format (:class:`ImageData`):

* ``npz``: a local directory (``$CLTUNNEL_DATA`` or ``data.root`` in YAML) with ``.npz`` files in the
  layout documented in the README (CIFAR-10 train may come in parts ``cifar10-train-part{k}.npz``).
* ``torchvision``: torchvision's own dataset classes, downloaded into a cache directory when online.

Augmentation (random crop with zero padding, horizontal flip) works on whole batches of device tensors:
per-sample Python in the hot loop is what makes stock pipelines slow on a GPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision.datasets as tvd

from cltunnel.config import RunConfig
from cltunnel.config import ConfigError
from cltunnel.errors import CltunnelError
from cltunnel.registry import Registry


DATA_ENV = "CLTUNNEL_DATA"


CACHE_ENV = "CLTUNNEL_CACHE"


class Dataset(NamedTuple):
    """What cltunnel knows of a dataset before loading it."""

    torchvision: str | None  # torchvision's class name (None: npz files only)
    classes: int
    shape: tuple[int, int, int]  # image shape C×H×W


DATASETS: Registry[Dataset] = Registry("dataset", ConfigError, {
    "cifar10": Dataset("CIFAR10", 10, (3, 32, 32)),
    "cifar100": Dataset("CIFAR100", 100, (3, 32, 32)),
    "mnist": Dataset("MNIST", 10, (1, 28, 28)),
    "fashion_mnist": Dataset("FashionMNIST", 10, (1, 28, 28)),
    "svhn": Dataset("SVHN", 10, (3, 32, 32)),  # the thesis's OOD set for chapter 6; torchvision only (split=, .labels)
})


def register_dataset(name: str, classes: int, shape: tuple[int, int, int], torchvision: str | None = None) -> Dataset:
    """A dataset of one's own: ``<name>.npz`` (or ``<name>-train.npz`` + ``<name>-test.npz``) in the data
    directory, in the format of the README's Data section; ``data: {name: <name>}`` then loads it."""
    return DATASETS.register(name, Dataset(torchvision, classes, tuple(shape)))


class DataNotFoundError(CltunnelError, FileNotFoundError):
    """Raised when neither the npz directory nor torchvision can provide a dataset."""


class DamagedDataError(CltunnelError):
    """A data file that exists but cannot be read (truncated copy, full disk, not an npz)."""


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file (no pickles); a damaged file is named, with its checksum verdict when the
    directory has a SHA256SUMS list, and how to re-create it."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise DamagedDataError(f"data file {path} is damaged or not an npz ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:120] if str(err) else ''}){_checksum_verdict(path)}; "
                               "copy it again, or re-create it with np.savez_compressed (layout in the README)"
                               ) from None


def _checksum_verdict(path: Path) -> str:
    sums = path.parent / "SHA256SUMS"
    if not sums.exists():
        return ""
    listed = {line.split()[-1].lstrip("*"): line.split()[0] for line in sums.read_text().splitlines() if line.strip()}
    if path.name not in listed:
        return f"; {path.name} is not listed in {sums}"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return "; its SHA256 matches SHA256SUMS" if digest == listed[path.name] else (
        f"; its SHA256 differs from the one in {sums}")


@dataclass
class ImageData:
    """A whole dataset as uint8 NCHW tensors plus the facts training needs about it."""

    name: str
    x_train: torch.Tensor  # uint8 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    # True where a test row holds exact pixels (CIFAR-10 here: rows 0..999; see the data README).
    test_lossless: torch.Tensor = field(default=None)  # type: ignore[assignment]
    source: str = ""
    _stats: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.test_lossless is None:
            self.test_lossless = torch.ones(len(self.y_test), dtype=torch.bool)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def has_lossy_test_rows(self) -> bool:
        return not bool(self.test_lossless.all())

    def with_test_images(self, x_test: torch.Tensor, name: str) -> ImageData:
        """This dataset with other test images (e.g. squared ones); the training images and the
        normalisation statistics taken from them stay as they are."""
        out = dataclasses.replace(self, name=name, x_test=x_test)
        out._stats = self.channel_stats()
        return out

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images on the [0, 1] scale (computed once).

        From a 256-bin histogram per channel: exact, and far cheaper than a float copy of the set.
        """
        if self._stats is None:
            values = torch.arange(256, dtype=torch.float64) / 255.0
            means, stds = [], []
            for c in range(self.x_train.shape[1]):
                counts = torch.bincount(self.x_train[:, c].flatten(), minlength=256).double()
                n, mean = counts.sum(), (counts * values).sum() / counts.sum()
                means.append(mean)
                stds.append(((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt())
            self._stats = (torch.stack(means).float(), torch.stack(stds).float())
        return self._stats


def default_data_dir() -> Path | None:
    value = os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "cltunnel")).expanduser()


def _to_nchw(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC or NHW arrays -> contiguous uint8 NCHW tensor."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))


def _npz_candidates(name: str) -> dict[str, list[str]]:
    """File names the npz source accepts for a dataset, in order of preference."""
    return {
        "train": [f"{name}.npz", f"{name}-train.npz", f"{name}-train-part0.npz"],
        "test": [f"{name}.npz", f"{name}-test.npz"],
    }


def _load_split(root: Path, name: str, split: str) -> dict[str, np.ndarray] | None:
    for fname in _npz_candidates(name)[split]:
        path = root / fname
        if not path.exists():
            continue
        if "-part0" in fname:
            return _load_parts(root, name)
        arrays = read_npz(path)
        if f"x_{split}" in arrays:
            return arrays
    return None


def _load_parts(root: Path, name: str) -> dict[str, np.ndarray]:
    parts = sorted(root.glob(f"{name}-train-part*.npz"), key=lambda p: int(p.stem.rsplit("part", 1)[1]))
    loaded = [read_npz(p) for p in parts]
    order = np.argsort([int(f["index_offset"]) if "index_offset" in f else i for i, f in enumerate(loaded)])
    out = {
        "x_train": np.concatenate([loaded[i]["x_train"] for i in order]),
        "y_train": np.concatenate([loaded[i]["y_train"] for i in order]),
    }
    if "classes" in loaded[0]:
        out["classes"] = loaded[0]["classes"]
    return out


def load_npz(name: str, root: Path) -> ImageData:
    """Read a dataset from ``root`` in the npz layout; raise DataNotFoundError naming what was looked for."""
    train, test = _load_split(root, name, "train"), _load_split(root, name, "test")
    if train is None or test is None:
        missing = [s for s, d in (("train", train), ("test", test)) if d is None]
        looked = sorted({f for s in missing for f in _npz_candidates(name)[s]})
        raise DataNotFoundError(
            f"dataset '{name}': no {' and no '.join(missing)} split in {root} "
            f"(looked for {', '.join(looked)} holding x_{missing[0]}/y_{missing[0]})."
        )
    classes = test.get("classes", train.get("classes"))
    n_classes = DATASETS[name].classes if name in DATASETS else int(train["y_train"].max()) + 1
    lossless = test.get("test_lossless_mask")
    return ImageData(
        name=name,
        x_train=_to_nchw(train["x_train"]),
        y_train=torch.from_numpy(train["y_train"].astype(np.int64)),
        x_test=_to_nchw(test["x_test"]),
        y_test=torch.from_numpy(test["y_test"].astype(np.int64)),
        classes=[str(c) for c in classes] if classes is not None else [str(i) for i in range(n_classes)],
        test_lossless=torch.from_numpy(lossless.astype(bool)) if lossless is not None else None,
        source=f"npz:{root}",
    )


def from_torchvision(name: str, train_set, test_set) -> ImageData:
    """Convert torchvision dataset objects (anything with ``.data``/``.targets``) to ImageData."""

    def arrays(ds) -> tuple[torch.Tensor, torch.Tensor]:
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        labels = ds.targets if hasattr(ds, "targets") else ds.labels  # SVHN names them labels
        targets = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        return _to_nchw(data), torch.from_numpy(targets.astype(np.int64))

    x_train, y_train = arrays(train_set)
    x_test, y_test = arrays(test_set)
    classes = getattr(train_set, "classes", None) or [str(c) for c in range(int(y_train.max()) + 1)]
    return ImageData(name, x_train, y_train, x_test, y_test, [str(c) for c in classes],
                     source=f"torchvision:{getattr(train_set, 'root', '?')}")


def load_torchvision(name: str, cache_dir: Path, download: bool) -> ImageData:
    cls = getattr(tvd, DATASETS[name].torchvision or "")
    split = (lambda train: {"split": "train" if train else "test"}) if name == "svhn" else (lambda train: {"train": train})
    try:
        train = cls(str(cache_dir), download=download, **split(True))
        test = cls(str(cache_dir), download=download, **split(False))
    except (RuntimeError, OSError) as err:  # torchvision says "Dataset not found" or a network error
        raise DataNotFoundError(f"dataset '{name}': torchvision could not load it from {cache_dir}: {err}") from err
    return from_torchvision(name, train, test)


def rendered_as(data: ImageData, shape: tuple[int, int, int]) -> ImageData:
    """``data`` in another dataset's input format (OOD probes: MNIST as 32x32 RGB for a CIFAR backbone).

    Grey images get the same value in every channel; sides are zero-padded (or cropped) around the centre,
    so the digit keeps its pixels exactly.
    """
    c, h, w = shape
    if data.shape[0] not in (1, c):
        raise ValueError(f"cannot render {data.name} ({data.shape[0]} channels) with {c} channels")

    def render(x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, c, -1, -1)
        dh, dw = h - x.shape[2], w - x.shape[3]
        pad = [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2]  # negative pads crop
        return torch.nn.functional.pad(x, pad).contiguous()

    return ImageData(f"{data.name}_as_{c}x{h}x{w}", render(data.x_train), data.y_train, render(data.x_test),
                     data.y_test, data.classes, data.test_lossless, data.source)


def load_dataset(name: str, root: str | Path | None = None, source: str = "auto",
                 download: bool = False, cache_dir: str | Path | None = None) -> ImageData:
    """One entry point for every dataset; ``source`` is ``auto``, ``npz`` or ``torchvision``.

    ``auto`` prefers the npz directory (exact, offline) and falls back to torchvision's cache.
    """
    DATASETS.get(name, "data.name")  # unknown: one line with the closest name
    root_path = Path(root).expanduser() if root else default_data_dir()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    errors: list[str] = []
    if source in ("auto", "npz"):
        if root_path is None:
            errors.append(f"no npz directory given (set ${DATA_ENV} or data.root)")
        else:
            try:
                return load_npz(name, root_path)
            except DataNotFoundError as err:
                errors.append(str(err))
    if source in ("auto", "torchvision"):
        try:
            return load_torchvision(name, cache, download)
        except DataNotFoundError as err:
            errors.append(str(err) + ("" if download else " (download is off)"))
    raise DataNotFoundError(
        "; ".join(errors)
        + f". To provide it: put the npz files in a directory and set ${DATA_ENV}=/that/dir (format in the "
        "README), or set `data: {download: true}` in the scenario to let torchvision download it when online."
    )


class DeviceAugment:
    """Random crop (zero padding) and horizontal flip of a uint8 batch, on whatever device it lives on."""

    def __init__(self, pad: int = 4, flip: bool = True) -> None:
        self.pad, self.flip = pad, flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        if self.pad:
            padded = torch.nn.functional.pad(x, (self.pad,) * 4)
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator, device=dev)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator, device=dev)
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
            batch = torch.arange(n, device=dev)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            flip = torch.rand(n, generator=generator, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


class Normalise:
    """uint8 -> standardised float, per channel, in one fused step on the device."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> "Normalise":
        self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale + self.shift


def load_data(cfg: RunConfig) -> ImageData:
    d = cfg.data
    return load_dataset(d.name, d.root, d.source, d.download, d.cache_dir)
