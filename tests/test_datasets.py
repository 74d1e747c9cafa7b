"""Tests for sparsat.node.data.datasets: IDX parsing, fallbacks, error messages and the seeded file
split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsat.node.data import datasets
from sparsat.node.data.datasets import DatasetMissingError, DatasetSpec, load_dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (independently of the reader, to catch header bugs)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    data = _idx_bytes(arr)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _fake_mnist(folder: Path, prefix: str, n: int, seed: int, gz: bool) -> tuple[np.ndarray, ...]:
    """Write random (n, 28, 28) images and labels for ``prefix``; return them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


@pytest.fixture
def no_debian(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Debian fallback at an empty dir so the real install cannot leak into tests."""
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", empty)
    return empty


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_round_trip_torchvision_layout(
    tmp_path: Path, no_debian: Path, gz: bool
) -> None:
    # Prepare
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    train_x, train_y = _fake_mnist(raw, "train", 7, seed=1, gz=gz)
    test_x, test_y = _fake_mnist(raw, "t10k", 3, seed=2, gz=gz)
    spec = DatasetSpec("fashion_mnist", root=str(tmp_path / "data"), download=False)

    # Execute
    train = load_dataset(spec, "train")
    test = load_dataset(spec, "test")

    # Assert
    assert len(train) == 7 and len(test) == 3
    # the ground station's cheap count (labels header only) agrees
    assert datasets.split_size(spec, "train") == 7 and datasets.split_size(spec, "test") == 3
    assert train.image_shape == (28, 28, 1) and test.image_shape == (28, 28, 1)
    assert train.num_classes == 10 and train.classes[0] == "T-shirt/top"
    for ds, xs, ys in ((train, train_x, train_y), (test, test_x, test_y)):
        for i in range(len(ds)):
            img = ds.image(i)
            assert img.dtype == np.uint8 and img.shape == (28, 28, 1)
            np.testing.assert_array_equal(img[..., 0], xs[i])
            assert ds.label(i) == int(ys[i]) and isinstance(ds.label(i), int)


def test_read_idx_rejects_truncated_payload(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(_idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))[:-1])

    # Execute / Assert
    with pytest.raises(ValueError, match="payload"):
        datasets.read_idx(path)


def test_fashion_mnist_debian_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    debian = tmp_path / "debian"
    xs, ys = _fake_mnist(debian, "t10k", 5, seed=3, gz=True)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", debian)
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    spec = DatasetSpec("fashion_mnist", root=str(empty_root), download=False)

    # Execute
    ds = load_dataset(spec, "test")

    # Assert
    assert len(ds) == 5
    np.testing.assert_array_equal(np.stack([ds.image(i)[..., 0] for i in range(5)]), xs)
    assert [ds.label(i) for i in range(5)] == ys.tolist()


def test_fashion_mnist_missing_names_paths_and_apt_get(tmp_path: Path, no_debian: Path) -> None:
    # Prepare
    spec = DatasetSpec("fashion_mnist", root=str(tmp_path / "nothing"), download=False)

    # Execute
    with pytest.raises(DatasetMissingError) as info:
        load_dataset(spec, "train")

    # Assert
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "nothing" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert str(no_debian / "train-labels-idx1-ubyte") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "download" in msg


def test_default_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare
    monkeypatch.setenv("SPARSAT_DATA", str(tmp_path))

    # Execute
    with_env = datasets.default_root()
    monkeypatch.delenv("SPARSAT_DATA")
    without_env = datasets.default_root()

    # Assert
    assert with_env == tmp_path
    assert without_env == Path.home() / ".cache" / "sparsat" / "data"


def _make_image_folder(root: Path, per_class: dict[str, int]) -> dict[str, int]:
    """Tiny PNGs whose red channel encodes the class index, so labels can be checked by pixel."""
    for ci, (name, n) in enumerate(sorted(per_class.items())):
        (root / name).mkdir(parents=True)
        for j in range(n):
            px = np.full((4, 6, 3), (ci * 50, j, 7), dtype=np.uint8)
            ext = ".PNG" if j % 2 else ".png"  # extensions must match case-insensitively
            Image.fromarray(px).save(root / name / f"img{j:02d}{ext}", format="PNG")
    (root / "cls_a" / "notes.txt").write_text("not an image")
    return {name: ci for ci, name in enumerate(sorted(per_class))}


def test_imagefolder_split_is_disjoint_complete_deterministic(tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "scenes"
    class_index = _make_image_folder(root, {"cls_b": 5, "cls_a": 10, "cls_c": 5})
    spec = DatasetSpec("imagefolder", root=str(root), split_seed=3)

    # Execute
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    test_again = load_dataset(spec, "test")
    other_seed = load_dataset(DatasetSpec("imagefolder", root=str(root), split_seed=4), "test")

    # Assert
    assert train.classes == ["cls_a", "cls_b", "cls_c"] and train.num_classes == 3
    assert isinstance(train, datasets.FileImageDataset)
    assert isinstance(test, datasets.FileImageDataset)
    assert isinstance(test_again, datasets.FileImageDataset)
    assert isinstance(other_seed, datasets.FileImageDataset)
    train_set, test_set = set(train.paths), set(test.paths)
    assert datasets.split_size(spec, "train") == len(train)
    assert not train_set & test_set
    assert len(train_set | test_set) == 20 and len(train) + len(test) == 20
    assert len(test) == 4  # stratified: 2 of cls_a, 1 each of cls_b and cls_c
    assert sorted(test.labels.tolist()) == [0, 0, 1, 2]
    assert test.paths == test_again.paths
    assert set(other_seed.paths) != test_set
    for ds in (train, test):
        for i in range(len(ds)):
            img = ds.image(i)
            assert img.dtype == np.uint8 and img.shape == (4, 6, 3)
            assert ds.label(i) == class_index[ds.paths[i].parent.name]
            assert img[0, 0, 0] == ds.label(i) * 50
    assert train.image_shape == (4, 6, 3)


def test_imagefolder_converts_grayscale_to_rgb_and_reports_mixed_shapes(tmp_path: Path) -> None:
    # Prepare
    root = tmp_path / "mixed"
    (root / "only").mkdir(parents=True)
    for j, size in enumerate([(5, 5), (5, 5), (5, 5), (5, 5), (9, 5)]):
        Image.new("L", size, color=j).save(root / "only" / f"{j}.bmp")
    spec = DatasetSpec("imagefolder", root=str(root), val_fraction=0.4)

    # Execute
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    both = [train, test]

    # Assert
    assert len(train) == 3 and len(test) == 2
    assert all(ds.image(i).shape[2] == 3 for ds in both for i in range(len(ds)))
    # one split holds the odd size, but the shape is the dataset's: sensor (train) and ground
    # station (test) must agree on whether payloads carry their image's shape
    assert sum(train.image(i).shape != (5, 5, 3) for i in range(len(train))) + sum(
        test.image(i).shape != (5, 5, 3) for i in range(len(test))) == 1
    assert train.image_shape is None and test.image_shape is None


@pytest.mark.parametrize("make", ["missing_root", "no_class_dirs", "no_images"])
def test_imagefolder_missing_explains_layout(tmp_path: Path, make: str) -> None:
    # Prepare
    root = tmp_path / "folder"
    if make != "missing_root":
        root.mkdir()
    if make == "no_images":
        (root / "cls").mkdir()
        (root / "cls" / "readme.txt").write_text("x")
    spec = DatasetSpec("imagefolder", root=str(root))

    # Execute
    with pytest.raises(DatasetMissingError) as info:
        load_dataset(spec, "train")

    # Assert
    assert "<class_name>" in str(info.value) and str(root) in str(info.value)


@pytest.mark.parametrize("name", ["cifar10", "eurosat"])
def test_torchvision_datasets_missing_without_download(tmp_path: Path, name: str) -> None:
    # Prepare
    spec = DatasetSpec(name, root=str(tmp_path), download=False)

    # Execute
    with pytest.raises(DatasetMissingError) as info:
        load_dataset(spec, "test")

    # Assert
    assert str(tmp_path) in str(info.value) and "download" in str(info.value)


@pytest.mark.parametrize(
    ("name", "split", "bad"),
    [("mnist_digits", "train", "mnist_digits"), ("fashion_mnist", "validation", "validation")],
)
def test_bad_name_or_split_raises_value_error(name: str, split: str, bad: str) -> None:
    # Prepare
    spec = DatasetSpec(name, download=False)

    # Execute / Assert
    with pytest.raises(ValueError, match=bad):
        load_dataset(spec, split)


def test_registry_lists_all_names() -> None:
    # Execute / Assert
    assert set(datasets.DATASETS) == {"fashion_mnist", "cifar10", "eurosat", "imagefolder"}


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian(tmp_path: Path) -> None:
    # Prepare: an empty root forces the Debian path (and no download)
    spec = DatasetSpec("fashion_mnist", root=str(tmp_path), download=False)

    # Execute
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")

    # Assert
    assert len(train) == 60000 and len(test) == 10000
    assert train.image_shape == (28, 28, 1) and test.image(0).shape == (28, 28, 1)
    assert train.num_classes == 10
    assert {train.label(i) for i in range(200)} == set(range(10))
    assert train.image(0).dtype == np.uint8 and int(train.image(0).max()) > 0
