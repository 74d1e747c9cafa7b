"""The token cache's keys: a changed dataset file, numpy version or token-shaping code misses;
an unchanged setup hits. Run through the encoder stage itself
(sparsat.ground_station.prepare._encode)
on an empty store and a small image folder, and on the key functions."""

from __future__ import annotations

import gzip
import os
import sys
import textwrap
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsat.ground_station import encoding
from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.encoding import encoder_digest, eval_key, stage_code, stage_digest
from sparsat.ground_station.prepare import Update, _encode
from sparsat.ground_station.store import SampleStore
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import (
    ArrayImageDataset,
    DatasetSpec,
    ImageDataset,
    files_digest,
    load_dataset,
)
from sparsat.node.data.masking import MaskSpec
from sparsat.node.models import encoders

MASK = MaskSpec(kind="fixed", ratio=0.5, seed=0)


@cache
def _encoder() -> encoders.Encoder:
    return encoders.create("vit_tiny_d8_patch4_28")


def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def _rewrite(path: Path) -> None:
    """Other pixels under the same name; the mtime moved on by a second, so that the change
    is seen on a filesystem whose clock is coarser than the two writes' interval."""
    before = path.stat()
    Image.fromarray(np.full((14, 14, 3), 7, dtype=np.uint8)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


class Stage:
    """The ground station's encoder stage on an empty store, a test split and one token
    cache: run() says whether the test split was read from the cache."""

    def __init__(self, tmp_path: Path, spec: DatasetSpec) -> None:
        self.spec = spec
        self.cfg = GroundStationConfig(
            sensor=SensorConfig(dataset=spec, mask=MASK), store_dir=tmp_path / "store",
            device="cpu", encode_batch=4, token_cache=tmp_path / "tc")
        self.store = SampleStore(tmp_path / "store.sqlite")
        self.encoder = _encoder()

    def run(self) -> tuple[bool, bool]:
        """(train split cached, test split cached) of one encoder stage, the test split
        loaded again from its files as Prepare does."""
        updates: list[Update] = []
        result: dict[str, encoding.TokenSet] = {}
        _encode(self.cfg, self.store, load_dataset(self.spec, "test"), self.encoder, updates,
                result)
        cached = {u.stage: u.cached for u in updates if u.done == u.total}
        return cached["encode train"], cached["encode test"]


@pytest.fixture()
def folder_stage(tmp_path: Path) -> Stage:
    _image_folder(tmp_path / "images")
    return Stage(tmp_path, DatasetSpec("imagefolder", root=str(tmp_path / "images"),
                                       download=False, val_fraction=0.4))


def test_an_unchanged_setup_hits_and_a_file_changed_in_place_misses(
        folder_stage: Stage) -> None:
    # Prepare: the cache filled once
    assert folder_stage.run() == (False, False)
    test_file = load_dataset(folder_stage.spec, "test").paths[0]  # type: ignore[attr-defined]

    # Execute / Assert: the same setup hits both splits; one test image rewritten under its
    # name misses the test split (the training split is the store's content: still a hit)
    assert folder_stage.run() == (True, True)
    _rewrite(test_file)
    assert folder_stage.run() == (True, False)
    assert folder_stage.run() == (True, True)  # the new entry is kept


def test_another_numpy_version_misses_both_splits(folder_stage: Stage,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    assert folder_stage.run() == (False, False)
    real = encoding.metadata.version

    def version(dist: str) -> str:
        return "0.0.1" if dist == "numpy" else real(dist)

    # Execute: the key reads the installed versions through importlib.metadata
    monkeypatch.setattr(encoding.metadata, "version", version)

    # Assert: the masks' and clouds' random streams may differ: nothing is reused
    assert folder_stage.run() == (False, False)
    monkeypatch.undo()
    assert folder_stage.run() == (True, True)


def test_a_changed_masking_function_misses_both_splits(folder_stage: Stage,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    assert folder_stage.run() == (False, False)
    masking = Path(sys.modules["sparsat.node.data.masking"].__file__ or "")
    real = encoding._source

    def edited(path: Path) -> bytes:  # node/data/masking.py as if one function had been changed
        data = real(path)
        return data.replace(b"def capture(", b"def capture(  ") if path == masking else data

    # Execute
    monkeypatch.setattr(encoding, "_source", edited)

    # Assert
    assert edited(masking) != real(masking)  # the edit applies to what the digest reads
    assert folder_stage.run() == (False, False)
    monkeypatch.undo()
    assert folder_stage.run() == (True, True)


def test_the_stage_code_is_found_from_the_import_graph() -> None:
    files, libraries = stage_code()
    # what shapes tokens: found by walking imports from sparsat.ground_station.encoding
    assert {"sparsat.ground_station.encoding", "sparsat.node.data.masking",
            "sparsat.node.data.clouds", "sparsat.node.wire.codec", "sparsat.node.models.encoders",
            "sparsat.node.data.datasets", "sparsat.node.data.sharding"} <= set(files)
    assert all(p.suffix == ".py" and p.is_file() for p in files.values())
    assert {"numpy", "torch", "timm", "PIL"} <= libraries  # PIL: a lazy import in a function
    assert not {"json", "hashlib", "os"} & libraries  # the standard library is left out
    assert stage_digest()["libraries"]["numpy"] == f"numpy=={np.__version__}"  # type: ignore[index]


def test_a_module_new_to_the_import_graph_is_followed_lazy_imports_included(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a package whose root imports a helper inside a function, relatively
    pkg = tmp_path / "shapes_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "root.py").write_text(textwrap.dedent("""
        import numpy as np

        def f():
            from .helper import g
            return g(np.zeros(1))
    """))
    (pkg / "helper.py").write_text("def g(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = stage_digest("shapes_pkg.root")

    # Execute: the helper changes; nothing names it anywhere but the import
    (pkg / "helper.py").write_text("def g(x):\n    return x + 1\n")

    # Assert
    files, libraries = stage_code("shapes_pkg.root")
    assert set(files) == {"shapes_pkg.root", "shapes_pkg.helper"} and libraries == {"numpy"}
    assert stage_digest("shapes_pkg.root")["code"] != before["code"]
    assert stage_digest("shapes_pkg.root") == stage_digest("shapes_pkg.root")


def _idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_files_digest_of_every_kind(tmp_path: Path) -> None:
    # Fashion-MNIST's IDX files (gz), found under root/FashionMNIST/raw
    raw = tmp_path / "fm" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    _idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28), dtype=np.uint8))
    _idx(raw / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 6, dtype=np.uint8))
    spec = DatasetSpec("fashion_mnist", root=str(tmp_path / "fm"), download=False)

    def digest(spec: DatasetSpec) -> str:
        return files_digest(load_dataset(spec, "test"))

    fm = digest(spec)
    assert digest(spec) == fm  # unchanged: the same
    _touch(raw / "t10k-labels-idx1-ubyte.gz")
    assert digest(spec) != fm

    # an image folder: a file changed in place, a file added, a file renamed
    _image_folder(tmp_path / "images")
    folder = DatasetSpec("imagefolder", root=str(tmp_path / "images"), download=False)
    steps: list[Callable[[], object]] = [
        lambda: None,
        lambda: _rewrite(tmp_path / "images" / "a" / "3.png"),
        lambda: Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(
            tmp_path / "images" / "b" / "9.png"),
        lambda: (tmp_path / "images" / "b" / "9.png").rename(tmp_path / "images" / "b" / "8.png"),
    ]
    seen = []
    for step in steps:
        step()
        seen.append(digest(folder))
    assert len(set(seen)) == len(seen)
    assert digest(folder) == seen[-1]

    # a dataset built in memory: digested by its pixels and labels
    images = rng.integers(0, 256, (4, 5, 5, 1), dtype=np.uint8)
    a = ArrayImageDataset(images, np.arange(4), ["x"] * 4)
    changed = images.copy()
    changed[2, 1, 1, 0] ^= 1
    assert files_digest(a) == files_digest(ArrayImageDataset(images.copy(), np.arange(4),
                                                             ["x"] * 4))
    assert files_digest(a) != files_digest(ArrayImageDataset(changed, np.arange(4), ["x"] * 4))


def test_the_test_key_holds_the_files_and_both_keys_the_stage(
        monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = _encoder()
    spec = DatasetSpec("fashion_mnist", download=False)
    enc = encoder_digest(encoder, 4)
    key = eval_key(enc, spec, "files:1", MASK, 10, None, 0)
    assert key != eval_key(enc, spec, "files:2", MASK, 10, None, 0)
    assert key == eval_key(encoder_digest(encoder, 4), spec, "files:1", MASK, 10, None, 0)
    monkeypatch.setattr(encoding, "stage_digest", lambda: {"code": "other"})
    assert encoder_digest(encoder, 4) != enc  # the train key starts with it too


def test_a_dataset_with_neither_files_nor_arrays_is_refused() -> None:
    class Opaque(ImageDataset):
        classes = ["x"]

        def __len__(self) -> int:
            return 1

        def image(self, i: int) -> np.ndarray:
            return np.zeros((2, 2, 1), np.uint8)

        def label(self, i: int) -> int:
            return 0

        @property
        def image_shape(self) -> tuple[int, int, int] | None:
            return (2, 2, 1)

    with pytest.raises(ValueError, match="Opaque names no source files"):
        files_digest(Opaque())
