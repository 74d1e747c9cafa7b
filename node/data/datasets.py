"""Image datasets as plain uint8 HWC numpy images: Fashion-MNIST, CIFAR-10, EuroSAT, image folders.

Everything here returns images at native resolution; resizing/normalisation is the caller's job so
that masking and tokenisation see the same pixels on every node.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "test")
# Module-level so tests (and unusual installs) can point the Debian fallback elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
EUROSAT_URL = "https://github.com/phelber/eurosat"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/ format spec).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class DatasetSpec:
    """Which dataset to load and where it lives."""

    name: str
    root: str | None = None
    download: bool = True
    val_fraction: float = 0.2
    split_seed: int = 0


class DatasetMissingError(FileNotFoundError):
    """The dataset's files are not on disk and could not be fetched."""


class ImageDataset(ABC):
    """Indexable labelled images; image(i) is uint8 (H, W, C) with C in {1, 3}."""

    classes: list[str]
    # the files this split's images, labels and membership were read from (empty: built in
    # memory); files_digest() names them, for caches that must notice a changed dataset
    sources: tuple[Path, ...] = ()

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (H, W, C) at native resolution."""

    @abstractmethod
    def label(self, i: int) -> int:
        """Class index of image ``i``."""

    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) shared by every image, or None when shapes differ."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ArrayImageDataset(ImageDataset):
    """Images held in memory as one (N, H, W, C) uint8 array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str],
                 sources: tuple[Path, ...] = ()) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(
                f"bad arrays: images {images.shape} {images.dtype}, {len(labels)} labels"
            )
        self.images = images
        self.labels = labels.astype(np.int64)
        self.classes = list(classes)
        self.sources = tuple(sources)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        img: np.ndarray = self.images[i]
        return img

    def label(self, i: int) -> int:
        return int(self.labels[i])

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        h, w, c = self.images.shape[1:]
        return (int(h), int(w), int(c))


class FileImageDataset(ImageDataset):
    """Images decoded lazily from files (PIL, converted to RGB) on each image() call."""

    def __init__(self, paths: list[Path], labels: np.ndarray, classes: list[str],
                 shape_paths: list[Path] | None = None) -> None:
        self.paths = list(paths)
        self.labels = labels.astype(np.int64)
        self.classes = list(classes)
        # image_shape is the whole dataset's, not this split's: the sensor (train split) and
        # the ground station (test split) must agree on whether payloads carry their shape
        self.shape_paths = list(shape_paths) if shape_paths is not None else self.paths
        # every file of the dataset: which ones fall in this split depends on all of them
        self.sources = tuple(self.shape_paths)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    @cached_property
    def image_shape(self) -> tuple[int, int, int] | None:
        from PIL import Image

        # Opening only reads headers, so this is cheap enough to do once over the dataset.
        sizes = set()
        for p in self.shape_paths:
            with Image.open(p) as im:
                sizes.add(im.size)
        if len(sizes) != 1:
            return None
        (w, h) = sizes.pop()
        return (h, w, 3)


def files_digest(dataset: ImageDataset) -> str:
    """A digest of the files `dataset` was read from: each one's absolute path, size and
    modification time (ns), not its bytes, so it costs one stat a file whatever the dataset's
    size. A file changed in place (same path) changes its mtime. A dataset built in memory
    (no files) is digested by its images and labels instead."""
    h = hashlib.blake2b(digest_size=16)
    if dataset.sources:
        for path in sorted(os.path.abspath(p) for p in dataset.sources):
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "files:" + h.hexdigest()
    if isinstance(dataset, ArrayImageDataset):
        h.update(str((dataset.images.shape, list(dataset.classes))).encode())
        h.update(np.ascontiguousarray(dataset.images).tobytes())
        h.update(dataset.labels.tobytes())
        return "arrays:" + h.hexdigest()
    raise ValueError(f"{type(dataset).__name__} names no source files and is not an array "
                     "dataset: its content cannot be digested")


def default_root() -> Path:
    """$SPARSAT_DATA if set, else ~/.cache/sparsat/data."""
    env = os.environ.get("SPARSAT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsat" / "data"


def _download_hint(spec: DatasetSpec) -> str:
    if spec.download:
        return "retry with internet access (download=True was tried)"
    return "set download=True (needs internet)"


def _root(spec: DatasetSpec) -> Path:
    return Path(spec.root).expanduser() if spec.root else default_root()


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): 2 zero bytes, type code, ndim, big-endian dims."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic; sniffing beats trusting the file name
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64))
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} but payload is {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def _find_idx_pair(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files for ``prefix`` in ``folder``, plain or .gz, if both exist."""
    found: list[Path] = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        hits = [p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return found[0], found[1]


def _load_fashion_mnist(spec: DatasetSpec, split: str) -> ImageDataset:
    root = _root(spec)
    prefix = "train" if split == "train" else "t10k"
    tv_raw = root / "FashionMNIST" / "raw"
    places = [tv_raw, DEBIAN_FASHION_MNIST_DIR]
    pair = next((p for p in (_find_idx_pair(d, prefix) for d in places) if p), None)
    failure = ""
    if pair is None and spec.download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=split == "train", download=True)
            pair = _find_idx_pair(tv_raw, prefix)
        except Exception as exc:  # offline/HTTP/checksum errors all mean the same thing here
            failure = f"torchvision download into {root} failed: {exc!r}\n"
    if pair is None:
        looked = "\n".join(
            f"  {d / f'{prefix}-{k}-ubyte'}[.gz]"
            for d in places
            for k in ("images-idx3", "labels-idx1")
        )
        raise DatasetMissingError(
            f"Fashion-MNIST {split} split not found. Looked for:\n{looked}\n{failure}"
            "Get it with: apt-get install -y dataset-fashion-mnist, or "
            f"{_download_hint(spec)}, or point root at a directory holding FashionMNIST/raw/. "
            f"Source: {FASHION_MNIST_URL}"
        )
    images, labels = read_idx(pair[0]), read_idx(pair[1])
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != (len(images),):
        raise ValueError(f"inconsistent IDX files {pair}: {images.shape} vs {labels.shape}")
    return ArrayImageDataset(images[..., None], labels, FASHION_MNIST_CLASSES, sources=pair)


def _torchvision_dataset(
    factory: Callable[[bool], Any], spec: DatasetSpec, what: str, url: str
) -> Any:
    """Build a torchvision dataset from disk, falling back to a download when allowed."""
    try:
        return factory(False)
    except RuntimeError as missing:  # torchvision's "Dataset not found" is a bare RuntimeError
        failure = f"not found on disk ({missing})"
    if spec.download:
        try:
            return factory(True)
        except Exception as exc:  # offline/HTTP/checksum errors all mean the same thing here
            failure += f"; download failed: {exc!r}"
    raise DatasetMissingError(
        f"{what} not found under {_root(spec)}: {failure}. Get it: {_download_hint(spec)}, or "
        f"point root at a directory holding torchvision's layout. Source: {url}"
    )


def _load_cifar10(spec: DatasetSpec, split: str) -> ImageDataset:
    from torchvision.datasets import CIFAR10

    root = str(_root(spec))
    ds = _torchvision_dataset(
        lambda dl: CIFAR10(root, train=split == "train", download=dl),
        spec,
        f"CIFAR-10 (expected {root}/cifar-10-batches-py)",
        CIFAR10_URL,
    )
    files = [*(ds.train_list if split == "train" else ds.test_list), ds.meta]
    folder = Path(root) / ds.base_folder
    return ArrayImageDataset(
        np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets), ds.classes,
        sources=tuple(folder / (f[0] if isinstance(f, list) else f["filename"]) for f in files),
    )


def split_indices(labels: np.ndarray, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """Stratified seeded split: per class, a val_fraction share goes to "test", the rest "train".

    Callers must pass labels in a machine-independent order (sorted paths) for determinism.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):  # sorted, so the rng is consumed in the same order everywhere
        idx = np.flatnonzero(labels == c)
        n_test = int(np.floor(len(idx) * val_fraction + 0.5))
        is_test[rng.permutation(idx)[:n_test]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _split_files(
    samples: list[tuple[Path, int]], classes: list[str], spec: DatasetSpec, split: str, base: Path
) -> ImageDataset:
    # Sort by path relative to the dataset root so the split ignores where the data was mounted.
    samples = sorted(samples, key=lambda s: s[0].relative_to(base).as_posix())
    labels = np.array([lab for _, lab in samples], dtype=np.int64)
    keep = split_indices(labels, split, spec.val_fraction, spec.split_seed)
    return FileImageDataset([samples[i][0] for i in keep], labels[keep], classes,
                            shape_paths=[p for p, _ in samples])


def _load_eurosat(spec: DatasetSpec, split: str) -> ImageDataset:
    from torchvision.datasets import EuroSAT

    root = str(_root(spec))
    ds = _torchvision_dataset(
        lambda dl: EuroSAT(root, download=dl),
        spec,
        f"EuroSAT RGB (expected {root}/eurosat/2750/<class>/*.jpg)",
        EUROSAT_URL,
    )
    samples = [(Path(p), int(t)) for p, t in ds.samples]
    return _split_files(samples, list(ds.classes), spec, split, Path(root) / "eurosat" / "2750")


def _load_imagefolder(spec: DatasetSpec, split: str) -> ImageDataset:
    root = _root(spec)
    expected = (
        f"Expected layout: {root}/<class_name>/*.{{jpg,jpeg,png,tif,tiff,bmp}} "
        "(e.g. an extracted RESISC45 or AID archive); set root to that directory."
    )
    if not root.is_dir():
        raise DatasetMissingError(f"image folder {root} does not exist. {expected}")
    classes: list[str] = []
    samples: list[tuple[Path, int]] = []
    # Hidden dirs (.ipynb_checkpoints, ...) and dirs without images are not classes.
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if files:
            samples += [(f, len(classes)) for f in files]
            classes.append(d.name)
    if not samples:
        raise DatasetMissingError(f"no class folders with images in {root}. {expected}")
    return _split_files(samples, classes, spec, split, root)


DATASETS: dict[str, Callable[[DatasetSpec, str], ImageDataset]] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "eurosat": _load_eurosat,
    "imagefolder": _load_imagefolder,
}


def split_size(spec: DatasetSpec, split: str) -> int:
    """The number of images in a split, reading as little as the format allows (Fashion-MNIST:
    the labels file's header, not 47 MB of pixels)."""
    if spec.name == "fashion_mnist":
        places = [_root(spec) / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST_DIR]
        prefix = "train" if split == "train" else "t10k"
        pair = next((p for p in (_find_idx_pair(d, prefix) for d in places) if p), None)
        if pair is not None:
            return len(read_idx(pair[1]))
    return len(load_dataset(spec, split))


def load_dataset(spec: DatasetSpec, split: str) -> ImageDataset:
    """Load ``split`` ("train" or "test") of the dataset named by ``spec``."""
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return DATASETS[spec.name](spec, split)


def split_labels(spec: DatasetSpec, split: str) -> np.ndarray:
    """Every label of a split, in index order (placement by class needs them)."""
    data = load_dataset(spec, split)
    return np.fromiter((data.label(i) for i in range(len(data))), np.int64, len(data))
