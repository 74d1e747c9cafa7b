"""Image codec benchmark: what coding a batch's canvases together would save (issue 26, item 1).

Run from the repo root: .venv/bin/python bench/pixel_codecs.py [--images N] [--train-images M]
    [--repeat R] [--out FILE.md] [--smoke]
For each codec setting and masking ratio r, on N Fashion-MNIST test images with fixed masks on
the 7x7 grid (visible_indices(MaskSpec("fixed", r), 49, "fashion_mnist/test/i"), as sparsat
draws them), each sample's canvas (masked_canvas: visible tiles in place, hidden ones zero) is
coded three ways:
- per image: encode_image of each canvas alone, what sparsat sends today (the visible-token
  code, a 7-byte bitmap or 2 bytes of runs at r = 0, is not counted in any column: it is
  `visible_code_bytes` in the JSON, the same for every codec);
- + dict ("a header shared per stream"): each image's coded bytes compressed alone by zstd at
  level 19 with a DICT_BYTES dictionary trained on the same codec's output for M training
  images (other images than the measured ones, same r), no content size, checksum or dict id
  in the frames; the dictionary itself (`dict_size`) would cross the uplink once;
- mosaic G: G consecutive canvases on a grid of ceil(sqrt(G)) columns (row-major, unused cells
  zero) coded as one image, cut back apart after decoding; bytes per image = every mosaic's
  bytes / N (N not a multiple of G: the last mosaic is partial, its empty cells zero).
PSNR is of the visible pixels only (the ground station zeroes hidden tiles), from the MSE
pooled over all N images; None (printed "lossless") when it is zero, which PNG must be. JPEG
2000's quality is OpenJPEG's target PSNR of the whole canvas, hidden zeros included, so its
visible pixels' PSNR comes out lower than the target when r > 0.
Times are the median over R runs of coding all N canvases, per image, on whatever the machine
is doing meanwhile. The last stdout line is one JSON object with every figure.
--smoke: 32 test images, a dictionary from 64 training images, one timed run (seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zstandard as zstd

from sparsat.bench import parse_args
from sparsat.node.data.config import ImageCodecSpec
from sparsat.node.data.datasets import DatasetMissingError, DatasetSpec, load_dataset
from sparsat.node.data.masking import MaskSpec, visible_indices
from sparsat.node.data.sharding import sample_id
from sparsat.node.wire.codec import encode_visible, masked_canvas
from sparsat.node.wire.images import codec_version, decode_image, encode_image

GRID = 7  # vit_tiny_d8_patch4_28's token grid: 4 x 4 tiles of a 28 x 28 image
RATIOS = (0.0, 0.5, 0.75)
SETTINGS = (
    ImageCodecSpec("png"),
    ImageCodecSpec("webp", 30), ImageCodecSpec("webp", 50), ImageCodecSpec("webp", 75),
    ImageCodecSpec("jpeg", 30), ImageCodecSpec("jpeg", 50),
    ImageCodecSpec("jpegxl", 30), ImageCodecSpec("jpegxl", 60),
    ImageCodecSpec("jpeg2k", 25), ImageCodecSpec("jpeg2k", 35),  # target PSNR, dB
)
MOSAICS = (4, 16, 64)
DICT_BYTES = 4096  # zstd dictionary, trained per codec setting and r
ZSTD_LEVEL = 19
SEED = 0  # the masks' seed (MaskSpec's default)
SMOKE = {"images": 32, "train_images": 64, "repeat": 1}
T = TypeVar("T")


def load_images(split: str, n: int, first: int = 0) -> tuple[np.ndarray, str]:
    """n images (n, 28, 28, 1) of `split` from index `first`, and the dataset's name."""
    try:
        ds = load_dataset(DatasetSpec("fashion_mnist"), split)
    except DatasetMissingError:
        print(f"note: Fashion-MNIST missing, using random uint8 28x28x1 images for {split}")
        rng = np.random.default_rng(first)
        return rng.integers(0, 256, (n, 28, 28, 1), np.uint8), "random"
    if first + n > len(ds):
        raise SystemExit(f"the {split} split has {len(ds)} images, {first + n} asked for")
    return np.stack([ds.image(first + i) for i in range(n)]), "fashion_mnist"


def masked(images: np.ndarray, split: str, ratio: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(canvases, visible-pixel masks, mean visible-token code bytes) of `images` under
    sparsat's fixed masks at `ratio`."""
    spec = MaskSpec("fixed", ratio, SEED)
    canvases, pixels, code = [], [], 0
    for i, image in enumerate(images):
        visible = visible_indices(spec, GRID * GRID, sample_id("fashion_mnist", split, i))
        canvases.append(masked_canvas(image, GRID, visible))
        pixels.append(masked_canvas(np.ones_like(image), GRID, visible) > 0)
        code += len(encode_visible(visible, GRID)[0])
    return np.stack(canvases), np.stack(pixels), code / len(images)


def psnr(original: np.ndarray, decoded: np.ndarray, visible: np.ndarray) -> float | None:
    """PSNR (dB) of the visible pixels, from their MSE pooled over every image; None: exact."""
    err = (original.astype(np.float64) - decoded.astype(np.float64))[visible]
    mse = float(np.mean(err**2))
    return None if mse == 0 else round(10 * math.log10(255**2 / mse), 2)


def timed(fn: Callable[[], T], repeat: int) -> tuple[T, float]:
    """fn's result and the median seconds of `repeat` runs."""
    times: list[float] = []
    out: T | None = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    assert out is not None
    return out, statistics.median(times)


def tile(canvases: np.ndarray, g: int) -> list[np.ndarray]:
    """Mosaics of g consecutive canvases each: ceil(sqrt(g)) columns, row-major, unused cells
    zero (the last mosaic is partial when len(canvases) is not a multiple of g)."""
    n, h, w, c = canvases.shape
    cols = math.ceil(math.sqrt(g))
    rows = math.ceil(g / cols)
    out = []
    for start in range(0, n, g):
        group = canvases[start : start + g]
        cells = np.zeros((rows * cols, h, w, c), np.uint8)
        cells[: len(group)] = group
        out.append(cells.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
                   .reshape(rows * h, cols * w, c))  # (rows*h, cols*w, c)
    return out


def untile(mosaics: Sequence[np.ndarray], g: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """The n canvases of `mosaics` (tile's inverse), (n, h, w, c)."""
    h, w, c = shape
    cols = math.ceil(math.sqrt(g))
    rows = math.ceil(g / cols)
    cells = [m.reshape(rows, h, cols, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, h, w, c)
             for m in mosaics]
    return np.concatenate(cells)[:n]


def per_image(spec: ImageCodecSpec, canvases: np.ndarray, repeat: int
              ) -> tuple[list[bytes], np.ndarray, float, float]:
    """(coded canvases, decoded canvases, encode s, decode s per image) of each canvas alone."""
    shape = canvases.shape[1:]
    coded, enc_s = timed(lambda: [encode_image(c, spec) for c in canvases], repeat)
    decoded, dec_s = timed(lambda: np.stack([decode_image(b, spec, shape) for b in coded]),
                           repeat)
    return coded, decoded, enc_s / len(canvases), dec_s / len(canvases)


def with_dictionary(coded: list[bytes], train: list[bytes]) -> tuple[float, int]:
    """(mean bytes of each of `coded` compressed alone with a dictionary trained on `train`,
    the dictionary's bytes); every frame is checked to decompress to its input."""
    samples: list[bytes | bytearray | memoryview] = list(train)  # zstandard's stub's type
    d = zstd.train_dictionary(DICT_BYTES, samples)
    cz = zstd.ZstdCompressor(level=ZSTD_LEVEL, dict_data=d, write_content_size=False,
                             write_checksum=False, write_dict_id=False)
    dz = zstd.ZstdDecompressor(dict_data=d)
    frames = [cz.compress(b) for b in coded]
    for b, f in zip(coded, frames, strict=True):
        if dz.decompress(f, max_output_size=len(b)) != b:
            raise RuntimeError("a zstd frame does not decompress to its coded image")
    return statistics.fmean(len(f) for f in frames), len(d.as_bytes())


def mosaic(spec: ImageCodecSpec, canvases: np.ndarray, g: int
           ) -> tuple[float, np.ndarray, float, float]:
    """(bytes per image, decoded canvases, encode s, decode s per image) of mosaics of g."""
    n = len(canvases)
    mosaics = tile(canvases, g)
    t0 = time.perf_counter()
    coded = [encode_image(m, spec) for m in mosaics]
    t1 = time.perf_counter()
    decoded = [decode_image(b, spec, m.shape) for b, m in zip(coded, mosaics, strict=True)]
    t2 = time.perf_counter()
    back = untile(decoded, g, n, canvases.shape[1:])
    return sum(map(len, coded)) / n, back, (t1 - t0) / n, (t2 - t1) / n


def label(spec: ImageCodecSpec) -> str:
    """A setting's name in the table: JPEG 2000's quality is a target PSNR, not a level."""
    return f"jpeg2k {spec.quality}dB" if spec.name == "jpeg2k" else spec.label


def bench_setting(spec: ImageCodecSpec, ratio: float, test: np.ndarray, train: np.ndarray,
                  repeat: int) -> dict[str, Any]:
    canvases, visible, code = masked(test, "test", ratio)
    train_canvases, _, _ = masked(train, "train", ratio)
    coded, decoded, enc_s, dec_s = per_image(spec, canvases, repeat)
    dict_mean, dict_size = with_dictionary(coded, [encode_image(c, spec) for c in train_canvases])
    row: dict[str, Any] = {
        "codec": label(spec), "name": spec.name, "quality": spec.quality, "ratio": ratio,
        "raw_bytes": round(float(visible.sum()) / len(test), 1),  # a raw payload's pixels
        "visible_code_bytes": round(code, 2),
        "bytes": round(statistics.fmean(map(len, coded)), 1),
        "dict_bytes": round(dict_mean, 1), "dict_size": dict_size,
        "psnr_db": psnr(canvases, decoded, visible),
        "encode_us": round(enc_s * 1e6, 1), "decode_us": round(dec_s * 1e6, 1),
    }
    for g in MOSAICS:
        per, back, m_enc, m_dec = mosaic(spec, canvases, g)
        row[f"mosaic{g}_bytes"] = round(per, 1)
        row[f"mosaic{g}_psnr_db"] = psnr(canvases, back, visible)
        row[f"mosaic{g}_encode_us"] = round(m_enc * 1e6, 1)
        row[f"mosaic{g}_decode_us"] = round(m_dec * 1e6, 1)
    return row


COLUMNS = ("codec", "r", "raw B", "per-image B", "+dict B", "mosaic4 B", "mosaic16 B",
           "mosaic64 B", "PSNR dB", "PSNR m16", "enc us", "dec us")


def cells(row: dict[str, Any]) -> list[str]:
    def db(v: float | None) -> str:
        return "lossless" if v is None else f"{v:.2f}"

    return [row["codec"], f"{row['ratio']:g}", f"{row['raw_bytes']:.0f}", f"{row['bytes']:.1f}",
            f"{row['dict_bytes']:.1f}", *(f"{row[f'mosaic{g}_bytes']:.1f}" for g in MOSAICS),
            db(row["psnr_db"]), db(row["mosaic16_psnr_db"]), f"{row['encode_us']:.0f}",
            f"{row['decode_us']:.0f}"]


def line(values: Sequence[str]) -> str:
    widths = (11, 4, 5, 11, 8, 9, 10, 10, 8, 8, 7, 7)
    return " ".join(f"{v:<{w}}" if k == 0 else f"{v:>{w}}"
                    for k, (v, w) in enumerate(zip(values, widths, strict=True)))


def markdown(rows: list[dict[str, Any]], figures: dict[str, Any], argv: Sequence[str]) -> str:
    cmd = " ".join(["python bench/pixel_codecs.py", *argv])
    head = [f"`{cmd}`: {figures['images']} {figures['dataset']} test images, dictionaries from "
            f"{figures['train_images']} training images; imagecodecs {figures['imagecodecs']}, "
            f"zstandard {figures['zstandard']}, {figures['date']}.", "",
            "Bytes are per image, the visible-token code not counted (a 7-byte bitmap, 2 bytes "
            "of runs at r = 0). raw B: the visible pixels a raw payload sends. +dict B: zstd "
            f"level {ZSTD_LEVEL} with a {DICT_BYTES}-byte dictionary (sent once, not counted). "
            "mosaic G B: G canvases coded as one image, all mosaics' bytes / N (the last one "
            "partial when G does not divide N). PSNR: the visible pixels, "
            "pooled over the images; m16: after a mosaic of 16. enc/dec us: per image, "
            "coded alone.", ""]
    table = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if k < 2 else "---:" for k in range(len(COLUMNS))) + "|"]
    table += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(head + table) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000, help="test images measured")
    p.add_argument("--train-images", type=int, default=1000,
                   help="training images the zstd dictionaries are trained on")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of the per-image coding")
    p.add_argument("--out", type=Path, help="also write the table as markdown to this file")
    args = parse_args(p, argv, SMOKE)
    test, dataset = load_images("test", args.images)
    train, _ = load_images("train", args.train_images)
    figures: dict[str, Any] = {
        "images": args.images, "train_images": args.train_images, "repeat": args.repeat,
        "dataset": dataset, "imagecodecs": codec_version(), "zstandard": zstd.__version__,
        "dict_bytes": DICT_BYTES, "zstd_level": ZSTD_LEVEL, "mosaics": list(MOSAICS),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(line(COLUMNS))
    rows = []
    for spec in SETTINGS:
        for ratio in RATIOS:
            rows.append(bench_setting(spec, ratio, test, train, args.repeat))
            print(line(cells(rows[-1])), flush=True)
    figures["rows"] = rows
    if args.out:
        args.out.write_text(markdown(rows, figures, sys.argv[1:] if argv is None else argv))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
