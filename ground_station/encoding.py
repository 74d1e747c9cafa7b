"""Encoder stage: stored payloads -> CLS token dataset; the test split -> CLS tokens.

Patch payloads are rebuilt into their canvas and only their visible tokens enter the ViT;
CLS payloads are dequantized as they are. Stored rows stream in, a chunk at a time, so memory
is the token dataset plus one chunk, whatever the store's size. Each set counts the encoder's
FLOPs (sparsat.node.models.encoders.encode_flops) and wall time, for the mission clock.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from sparsat.ground_station.store import Row
from sparsat.node.data.config import ImageCodecSpec
from sparsat.node.data.datasets import DatasetSpec, ImageDataset, default_root
from sparsat.node.data.masking import MaskSpec, capture
from sparsat.node.data.sharding import sample_id as make_sample_id
from sparsat.node.data.sharding import train_subset
from sparsat.node.models.encoders import Encoder, encode_flops, hash_weights
from sparsat.node.wire.basis import Basis
from sparsat.node.wire.codec import (
    decode_patches,
    dequantize_token,
    parse_patch_record,
    quantize_token,
)
from sparsat.node.wire.images import as_sent, codec_version, parse_coded_record

RAW = ImageCodecSpec()  # patches as their tiles' pixels
Progress = Callable[[int, int], None]
Projection = tuple[Mapping[int, Basis], Basis]  # projected CLS payloads: bases, the final one
log = logging.getLogger("sparsat.ground_station")
PENDING_CANVAS_BYTES = 256 << 20  # decoded canvases held for one encoder batch, at most


@dataclass
class TokenSet:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) int64: compact sample ids (stored samples) or dataset indices
    flops: int = 0  # the encoder's compute for this set
    wall_s: float = 0.0
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) bool
    skipped: int = 0  # images with no usable token (clouds): not in the set
    # clouds: (tokens truly usable, truly cloudy, false positives, false negatives) of the
    # sensors' cloud detector on every image of the split (usable: cover <= max_cloud);
    # the oracle's errors are 0
    detector: tuple[int, int, int, int] = (0, 0, 0, 0)

    def subset(self, rows: np.ndarray) -> TokenSet:
        return TokenSet(self.features[rows], self.labels[rows], self.ids[rows])


def encode_rows(rows: Iterable[Row], total: int, encoder: Encoder, batch_size: int,
                cls_dtype: str, progress: Progress | None = None,
                projection: Projection | None = None,
                codec: ImageCodecSpec | None = None) -> TokenSet:
    """Encode `total` stored samples (patches through the encoder, CLS tokens dequantized;
    projected ones decoded with their basis and, like plain tokens sent before a basis, recoded
    through the final one: `projection` = (bases by version, final))."""
    t0 = time.perf_counter()
    features = np.empty((total, encoder.dim), dtype=np.float32)
    labels = np.empty(total, dtype=np.int64)
    ids = np.empty(total, dtype=np.int64)
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (row, canvas, visible)
    flops, count, held = 0, 0, 0  # held: bytes of the pending canvases
    bases, final = projection if projection is not None else ({}, None)
    recode = np.zeros(total, dtype=bool)  # rows to pass through the final basis

    def flush() -> None:
        if pending:
            at = [r for r, _, _ in pending]
            features[at] = encoder.encode_canvases(
                [c for _, c, _ in pending], [v for _, _, v in pending], batch_size)
            pending.clear()

    for k, row in enumerate(rows):
        if k >= total:
            raise RuntimeError(f"store yielded more than the {total} samples expected")
        ids[k], labels[k] = row.id, row.label
        if not row.height and row.basis:  # codes of a projected token
            b = bases[row.basis]
            u, _ = b.decode(np.frombuffer(row.data, np.uint8).reshape(1, -1),
                            np.array([row.scale], np.float32))
            features[k] = b.reconstruct(u)[0]
            recode[k] = final is not None and row.basis != final.version
        elif not row.height:  # a CLS token
            features[k] = dequantize_token(row.data, cls_dtype, encoder.dim, row.scale)
            recode[k] = final is not None
        elif codec is not None and codec.coded:  # a coded image: decoded, hidden tiles zero
            canvas, visible = parse_coded_record(
                row.data, row.runs, (row.height, row.width, row.channels), encoder.grid, codec)
            pending.append((k, canvas, visible))
            flops += encode_flops(encoder.cfg, len(visible))
        else:
            data = parse_patch_record(row.data, row.runs, (row.height, row.width, row.channels),
                                      encoder.grid)
            pending.append((k, decode_patches(data), data.visible_idx))
            flops += encode_flops(encoder.cfg, len(data.visible_idx))
            # a sample may say 8192 x 8192 (check_patches' limit) and send one tile: its
            # canvas is 192 MiB, so canvases are held up to a byte budget, not only a count
            held += pending[-1][1].nbytes
            if len(pending) >= batch_size or held >= PENDING_CANVAS_BYTES:
                held = 0
                flush()
                if progress:
                    progress(k + 1, total)
        count = k + 1
    flush()
    if count != total:
        raise RuntimeError(f"store yielded {count} samples, expected {total}")
    if final is not None and recode.any():
        features[recode] = final.recode(features[recode])
    if progress:
        progress(total, total)
    return TokenSet(features, labels, ids, flops, time.perf_counter() - t0)


def encode_split(dataset: ImageDataset, split: str, name: str, mask: MaskSpec,
                 encoder: Encoder, batch_size: int, subset: int | None = None, seed: int = 0,
                 progress: Progress | None = None,
                 indices: np.ndarray | None = None,
                 codec: ImageCodecSpec | None = None) -> TokenSet:
    """Encode a split held at the ground station (the test set) under the scenario's mask,
    and through the patch payloads' image codec when given (coded, decoded, hidden tiles
    zero: what a satellite's coded sample becomes at the ground station).

    Clouds: every image gets its own clouds (its id seeds them, so other seeds than the
    training images'); an image with no usable token is left out and counted, and the groups
    `clear` (no cloud at all) and `cloudy` say which rows are which."""
    t0 = time.perf_counter()
    # Evaluation must be repeatable: `random` masks are drawn like `fixed` ones here.
    eval_mask = MaskSpec("fixed", mask.ratio, mask.seed) if mask.kind == "random" else mask
    if indices is None:  # else: the images given (the validation split)
        indices = train_subset(len(dataset), subset, seed)
    grid = encoder.grid
    features = np.empty((len(indices), encoder.dim), dtype=np.float32)
    labels = np.array([dataset.label(int(i)) for i in indices], dtype=np.int64)
    names = [make_sample_id(name, split, int(i)) for i in indices]
    covers = np.zeros(len(indices))
    kept = np.zeros(len(indices), dtype=bool)
    flops = 0
    cloudy, fp, fn = 0, 0, 0  # the detector's tokens truly cloudy, and its errors
    for start in range(0, len(indices), batch_size):
        rows = range(start, min(start + batch_size, len(indices)))
        caps = [capture(eval_mask, dataset.image(int(indices[r])), grid, names[r])
                for r in rows]
        covers[start : rows.stop] = [c.cover for c in caps]
        cloudy += sum(c.cloudy_tokens for c in caps)
        fp += sum(c.false_positives for c in caps)
        fn += sum(c.false_negatives for c in caps)
        use = [(r, c) for r, c in zip(rows, caps, strict=True) if len(c.visible)]
        used = [r for r, _ in use]
        kept[used] = True
        if use:
            features[used] = encoder.encode_canvases(
                [as_sent(c.image, grid, c.visible, codec or RAW) for _, c in use],
                [c.visible for _, c in use], batch_size)
            flops += sum(encode_flops(encoder.cfg, len(c.visible)) for _, c in use)
        if progress:
            progress(rows.stop, len(indices))
    out = TokenSet(features, labels, indices.astype(np.int64)).subset(np.flatnonzero(kept))
    out.flops, out.wall_s, out.skipped = flops, time.perf_counter() - t0, int((~kept).sum())
    if mask.kind == "clouds":
        out.groups = {"clear": covers[kept] == 0, "cloudy": covers[kept] > 0}
        out.detector = (len(indices) * grid * grid - cloudy, cloudy, fp, fn)
    return out


def requantize(features: np.ndarray, dtype: str) -> np.ndarray:
    """Round-trip tokens through the wire dtype, as a satellite's CLS payload would be."""
    out = np.empty_like(features)
    for i, tok in enumerate(features):
        data, scale = quantize_token(tok, dtype)
        out[i] = dequantize_token(data, dtype, len(tok), scale)
    return out


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ---- what the encoder stage's code is: derived from its imports, not a hand-kept number ------

STAGE_ROOT = __name__  # the encoder stage: this module and everything it imports


@functools.cache
def _owners() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()  # top-level module -> distributions (~0.4 s)


def _third_party(top: str) -> bool:
    """A top-level module some other distribution installed (not stdlib, not sparsat's own
    packages, whether sparsat is installed or run from its source tree)."""
    return any(d != "sparsat" for d in _owners().get(top, []))


def _module_file(name: str) -> Path | None:
    """The source file of module `name`, None when it is not a module (a name imported from
    one) or has no Python source."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # "x.y.z" where x.y is a module, not a package
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported(name: str, path: Path, tree: ast.Module) -> set[str]:
    """Every module name `tree` imports, at the top or inside functions (lazy imports count:
    they shape tokens too); `from a import b` yields a.b and a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return {m for m in out if m}


def _source(path: Path) -> bytes:
    return path.read_bytes()


def stage_code(root: str = STAGE_ROOT) -> tuple[dict[str, Path], set[str]]:
    """The encoder stage's code, found by walking the import graph from `root`: the source
    file of every project module it imports, transitively, and the third-party distributions
    those modules import (top-level names; the standard library is left out)."""
    files: dict[str, Path] = {}
    libraries: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in files:
            continue
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top == "__future__":
            continue
        if _third_party(top):
            libraries.add(top)
            continue
        path = _module_file(name)
        if path is None:
            continue
        files[name] = path
        todo += sorted(_imported(name, path, ast.parse(_source(path), str(path))))
    return files, libraries


def _version(top: str) -> str:
    dists = sorted(_owners().get(top, [top]))
    return ",".join(f"{d}=={metadata.version(d)}" for d in dists)


def stage_digest(root: str = STAGE_ROOT) -> dict[str, object]:
    """What the encoder stage's own code and libraries are: a digest of the source bytes of
    every project module `root` imports (stage_code: codec, masking, clouds, encoders,
    datasets, sharding, the store, this module...), and the installed version of every
    third-party distribution they import (numpy's random streams draw the masks and clouds,
    which numpy does not promise to keep across versions; timm, PIL, torchvision...)."""
    files, libraries = stage_code(root)
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(files):
        source = _source(files[name])
        h.update(f"{name}\0{len(source)}\0".encode())
        h.update(source)
    return {"code": h.hexdigest(), "libraries": {t: _version(t) for t in sorted(libraries)}}


def encoder_digest(encoder: Encoder, batch_size: int) -> str:
    """What the encoder stage's output depends on besides its input: the architecture and its
    weights (every tensor's name, dtype, shape and bytes), pooling, the device kind, the batch
    size (batch composition moves results by float rounding), torch (its build included), and
    the stage's code and libraries (stage_digest)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    cfg = {k: v for k, v in asdict(encoder.cfg).items() if k != "default_weights"}
    h.update(_json([stage_digest(), torch.__version__, cfg, encoder.pooling,
                    encoder.mean.device.type, batch_size]).encode())
    if encoder.precision != "float32":  # the precision computed in (float32 keys unchanged)
        h.update(_json(["precision", encoder.precision]).encode())
    hash_weights(h, encoder)
    return h.hexdigest()


def train_key(encoder: str, store_digest: str, cls_dtype: str | None,
              codec: ImageCodecSpec | None = None) -> dict[str, object]:
    """The training split's key: the encoder, and the stored samples themselves (every id and
    its content in id order: SampleStore.content_digest), plus how CLS payloads are read
    (`cls_dtype`; None for patch payloads). Which satellites sent them, the subset and seed
    that picked them, the mask that made them: all in the content, nothing else read."""
    # coded patch payloads: how the stored bytes decode (the codec, its settings, whether a
    # header is joined, and the library: lossy streams decode per library version)
    coded = ({"codec": [codec.name, codec.quality, codec.header, codec_version()]}
             if codec is not None and codec.coded else {})
    return {"stage": "train", "encoder": encoder, "store": store_digest,
            "cls_dtype": cls_dtype, **coded}


def eval_key(encoder: str, dataset: DatasetSpec, files: str, mask: MaskSpec, n_test: int,
             subset: int | None, seed: int,
             validation: tuple[int, int] | None = None,
             codec: ImageCodecSpec | None = None) -> dict[str, object]:
    """The test split's key: the encoder, the dataset (its spec, the root resolved, and
    `files`: sparsat.node.data.datasets.files_digest of the split as loaded), the mask as
    encode_split
    applies it, and the test images picked. Not the payload: a CLS payload's
    requantization is applied after the cache."""
    if mask.kind == "clouds":
        m: dict[str, object] = {"kind": "clouds", "ratio": mask.ratio, "seed": mask.seed,
                                "clouds": asdict(mask.clouds), "max_cloud": mask.max_cloud}
    elif mask.kind == "none" or mask.ratio == 0.0:
        m = {"kind": "none"}  # every token
    else:  # random masks are evaluated as fixed ones (encode_split)
        m = {"kind": "fixed", "ratio": mask.ratio, "seed": mask.seed}
    if mask.choice != "random" and m["kind"] != "none":  # chosen by content: by the image
        m["choice"] = mask.choice
    if mask.detector != "oracle":  # clouds as an on-board detector calls them
        m["detector"] = mask.detector
        m["detector_params"] = mask.detector_params
    ds = {k: v for k, v in asdict(dataset).items() if k != "download"}
    ds["root"] = str(Path(dataset.root).expanduser().resolve() if dataset.root
                     else default_root().resolve())
    picked: object = "all" if subset is None or subset >= n_test else [subset, seed]
    # a coded patch payload's pixels: the codec, its quality and the library that codes them
    # (a raw payload's keys are as before the codecs came)
    coded = ({"codec": [codec.name, codec.quality, codec_version()]}
             if codec is not None and codec.coded else {})
    if validation is not None:  # (train_subset, validation_subset) of the training split
        return {"stage": "validation", "encoder": encoder, "dataset": ds, "files": files,
                "mask": m, "images": [*validation, seed], **coded}
    return {"stage": "test", "encoder": encoder, "dataset": ds, "files": files, "mask": m,
            "images": picked, **coded}


class TokenCache:
    """Encoded splits on disk, content-addressed: a file's name is a digest of its key (see
    train_key and eval_key), and the key is stored in it too. The folder may be shared by any
    number of runs and processes: a file is written under a name of its own and renamed into
    place (a reader never sees half a file; two writers of the same entry write the same
    content, the last rename wins), and a file that cannot be read back whole, or holds
    another key, is a miss (computed again and replaced)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, key: dict[str, object]) -> Path:
        digest = hashlib.blake2b(_json(key).encode(), digest_size=16).hexdigest()
        return self.folder / f"{key['stage']}-{digest}.npz"

    def get(self, key: dict[str, object]) -> TokenSet | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != _json(key):
                    raise ValueError("another key")
                groups = {k[len("group_"):]: z[k] for k in z.files if k.startswith("group_")}
                out = TokenSet(z["features"], z["labels"], z["ids"], int(z["flops"]),
                               float(z["wall_s"]), groups, int(z["skipped"]))
                mask = key.get("mask")
                if (isinstance(mask, dict) and mask.get("kind") == "clouds"
                        and "detector" not in z.files):  # written before detectors counted
                    raise ValueError("a cloud split without its detector counts")
                if "detector" in z.files:
                    d = [int(v) for v in z["detector"]]
                    if len(d) != 4:
                        raise ValueError("a detector entry of another length")
                    out.detector = (d[0], d[1], d[2], d[3])
            n = len(out.labels)
            if (out.features.ndim != 2 or len(out.features) != n or len(out.ids) != n
                    or any(len(g) != n for g in groups.values())):
                raise ValueError("arrays of different lengths")
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign: a miss
            log.warning("token cache %s unreadable (%s): encoding again", path, e)
            return None
        return out

    def put(self, key: dict[str, object], tokens: TokenSet) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        arrays: dict[str, Any] = {
            "key": np.array(_json(key)), "features": tokens.features, "labels": tokens.labels,
            "ids": tokens.ids, "flops": tokens.flops, "wall_s": tokens.wall_s,
            "skipped": tokens.skipped, "detector": np.array(tokens.detector, np.int64),
            **{f"group_{k}": v for k, v in tokens.groups.items()}}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared folder's other users out
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
