"""Payload codecs: visible patches at native resolution, and CLS tokens.

Patches: the mask lives on the encoder's g x g token grid; token i maps to one native tile
with edges round(k * H / g), so tiles partition the image exactly even when g does not
divide H. A payload is the visible indices plus those tiles' uint8 pixels, concatenated.
CLS tokens: float32, float16, or int8 with one symmetric scale per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsat.node.data.tiles import tile_edges


class CodecError(ValueError):
    """A payload whose fields do not describe a valid image or token."""


@dataclass(frozen=True)
class PatchData:
    height: int
    width: int
    channels: int
    grid: int
    visible_idx: np.ndarray  # (L,) uint16, sorted, unique
    pixels: bytes  # uint8 tiles (h, w, C) concatenated in visible_idx order


def tile_sizes(height: int, width: int, grid: int) -> np.ndarray:
    """Pixels per channel of each token's tile, (g*g,) row-major."""
    hs = np.diff(tile_edges(height, grid))
    ws = np.diff(tile_edges(width, grid))
    return np.outer(hs, ws).reshape(-1)


def encode_patches(image: np.ndarray, grid: int, visible_idx: np.ndarray) -> PatchData:
    """Cut the visible tiles out of `image` (H, W, C) uint8."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise CodecError(f"image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    if grid < 1 or grid > min(height, width):
        raise CodecError(f"grid {grid} does not fit a {height}x{width} image")
    raw = np.asarray(visible_idx)
    if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= grid * grid):
        raise CodecError(f"visible indices must be in [0, {grid * grid})")  # before uint16 wraps
    idx = raw.astype(np.uint16)
    ys, xs = tile_edges(height, grid), tile_edges(width, grid)
    parts = []
    for t in idx.tolist():
        r, c = divmod(t, grid)
        parts.append(image[ys[r] : ys[r + 1], xs[c] : xs[c + 1], :].tobytes())
    return PatchData(height, width, channels, grid, idx, b"".join(parts))


def check_patches(data: PatchData, max_side: int = 8192) -> None:
    """Raise CodecError naming the first field that is wrong."""
    check_tiles(data.height, data.width, data.channels, data.grid, data.visible_idx, max_side)
    expected = int(tile_sizes(data.height, data.width, data.grid)[data.visible_idx].sum()
                   ) * data.channels
    if len(data.pixels) != expected:
        raise CodecError(f"pixels: {len(data.pixels)} bytes, the visible tiles need {expected}")


def check_tiles(height: int, width: int, channels: int, grid: int, idx: np.ndarray,
                max_side: int = 8192) -> None:
    """The shape, grid and visible indices of a patch payload (CodecError: the first wrong)."""
    if not (1 <= height <= max_side and 1 <= width <= max_side):
        raise CodecError(f"image size {height}x{width} out of range 1..{max_side}")
    if channels not in (1, 3):
        raise CodecError(f"channels must be 1 or 3, got {channels}")
    if not 1 <= grid <= min(height, width):
        raise CodecError(f"grid {grid} does not fit a {height}x{width} image")
    n_tokens = grid * grid
    if idx.size == 0:
        raise CodecError("no visible tokens")
    if idx.size > n_tokens:
        raise CodecError(f"{idx.size} visible tokens on a grid of {n_tokens}")
    if int(idx.max()) >= n_tokens:
        raise CodecError(f"visible index {int(idx.max())} out of range for grid {grid}")
    if idx.size > 1 and not bool(np.all(np.diff(idx.astype(np.int64)) > 0)):
        raise CodecError("visible indices must be sorted and unique")


def decode_patches(data: PatchData) -> np.ndarray:
    """The canvas (H, W, C) uint8 with the visible tiles in place and zeros elsewhere."""
    check_patches(data)
    canvas = np.zeros((data.height, data.width, data.channels), dtype=np.uint8)
    ys, xs = tile_edges(data.height, data.grid), tile_edges(data.width, data.grid)
    buf = np.frombuffer(data.pixels, dtype=np.uint8)
    offset = 0
    for t in data.visible_idx.tolist():
        r, c = divmod(t, data.grid)
        h, w = ys[r + 1] - ys[r], xs[c + 1] - xs[c]
        n = int(h * w * data.channels)
        canvas[ys[r] : ys[r + 1], xs[c] : xs[c + 1], :] = buf[offset : offset + n].reshape(
            h, w, data.channels
        )
        offset += n
    return canvas


def masked_canvas(image: np.ndarray, grid: int, visible_idx: np.ndarray) -> np.ndarray:
    """What the ground station rebuilds from a patch payload; sensors encode the same canvas."""
    return decode_patches(encode_patches(image, grid, visible_idx))


# ---- visible-token codes ----------------------------------------------------------------
# Which tokens a patch payload carries: a bitmap of the g x g grid (token t is bit t % 8 of
# byte t // 8), or runs (varints alternating hidden, visible, hidden..., the first may be 0,
# summing to g*g), whichever is smaller. Both are self-delimiting given g, so the pixels
# follow the code in the same bytes field.


def bitmap_bytes(grid: int) -> int:
    return (grid * grid + 7) // 8


def varint(n: int) -> bytes:
    """n (>= 0) as a protobuf base-128 varint: 7 bits a byte, low group first."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _runs(visible: np.ndarray, n_tokens: int) -> list[int]:
    mask = np.zeros(n_tokens, dtype=np.int8)
    mask[np.asarray(visible, dtype=np.int64)] = 1
    changes = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    runs = np.diff([0, *changes.tolist(), n_tokens]).tolist()
    return runs if mask[0] == 0 else [0, *runs]  # the first run is a hidden one


def encode_visible(visible: np.ndarray, grid: int) -> tuple[bytes, bool]:
    """(code, is_runs): the smaller of the bitmap and the run code (the bitmap on a tie)."""
    n_tokens = grid * grid
    bits = np.zeros(bitmap_bytes(grid) * 8, dtype=np.uint8)
    bits[np.asarray(visible, dtype=np.int64)] = 1
    bitmap = np.packbits(bits, bitorder="little").tobytes()
    runs = b"".join(varint(r) for r in _runs(visible, n_tokens))
    return (runs, True) if len(runs) < len(bitmap) else (bitmap, False)


# bits of each byte value, LSB first: BIT_TABLE[code_bytes] unpacks bitmaps in one gather
BIT_TABLE = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")


def decode_visible(record: bytes, runs: bool, grid: int) -> tuple[np.ndarray, int]:
    """(visible indices uint16, code length) from the start of `record`."""
    n_tokens = grid * grid
    if not runs:
        nb = bitmap_bytes(grid)
        if len(record) < nb:
            raise CodecError(f"visible-token bitmap needs {nb} bytes, the payload has "
                             f"{len(record)}")
        bits = BIT_TABLE[np.frombuffer(record, np.uint8, nb)].reshape(-1)
        if bits[n_tokens:].any():
            raise CodecError(f"visible-token bitmap sets bits past the {n_tokens} tokens")
        return np.flatnonzero(bits).astype(np.uint16), nb
    # every run is checked against what is left of the grid before anything is allocated,
    # and a varint longer than g*g's own is refused: a count from the wire never sizes memory
    max_len = max(1, (n_tokens.bit_length() + 6) // 7)
    pos, total, visible, out = 0, 0, False, []
    while total < n_tokens:
        first = pos == 0
        run, shift, start = 0, 0, pos
        while True:
            if pos >= len(record):
                raise CodecError("visible-token runs end early")
            if pos - start >= max_len:
                raise CodecError(f"visible-token runs are malformed: a varint longer than "
                                 f"{max_len} bytes, the most {n_tokens} tokens need")
            byte = record[pos]
            pos += 1
            run |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if run == 0 and not first:
            raise CodecError("visible-token runs: only the first run may be empty")
        if run > n_tokens - total:
            raise CodecError(f"visible-token runs sum to {total + run}, the grid has "
                             f"{n_tokens} tokens")
        if visible:
            out.append(np.arange(total, total + run))
        total += run
        visible = not visible
    idx = np.concatenate(out) if out else np.zeros(0, np.int64)
    return idx.astype(np.uint16), pos


def patch_record(data: PatchData) -> tuple[bytes, bool]:
    """A patch payload as one bytes field: its visible-token code, then its pixels."""
    code, runs = encode_visible(data.visible_idx, data.grid)
    return code + data.pixels, runs


def parse_patch_record(record: bytes, runs: bool, shape: tuple[int, int, int],
                       grid: int) -> PatchData:
    """The PatchData of a record, checked (CodecError names what is wrong)."""
    visible, n = decode_visible(record, runs, grid)
    data = PatchData(shape[0], shape[1], shape[2], grid, visible, record[n:])
    check_patches(data)
    return data


# ---- CLS tokens ---------------------------------------------------------------------------

CLS_DTYPES = ("float32", "float16", "int8")
CLS_ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}  # bytes a value


def quantize_token(token: np.ndarray, dtype: str) -> tuple[bytes, float]:
    """(bytes, scale) of one (D,) float token; scale is 0.0 unless dtype is int8."""
    vec = np.asarray(token, dtype=np.float32).reshape(-1)
    if dtype == "float32":
        return vec.astype("<f4").tobytes(), 0.0
    if dtype == "float16":
        return vec.astype("<f2").tobytes(), 0.0
    if dtype == "int8":
        peak = float(np.abs(vec).max()) if vec.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(vec / scale), -127, 127).astype(np.int8)
        return q.tobytes(), scale
    raise CodecError(f"CLS dtype must be one of {CLS_DTYPES}, got {dtype!r}")


def dequantize_token(data: bytes, dtype: str, dim: int, scale: float = 0.0) -> np.ndarray:
    itemsize = CLS_ITEMSIZE.get(dtype)
    if itemsize is None:
        raise CodecError(f"CLS dtype must be one of {CLS_DTYPES}, got {dtype!r}")
    if len(data) != dim * itemsize:
        raise CodecError(f"CLS token: {len(data)} bytes, {dtype} x {dim} needs {dim * itemsize}")
    if dtype == "int8":
        if not (np.isfinite(scale) and scale > 0):
            raise CodecError(f"int8 CLS token needs a finite positive scale, got {scale}")
        return np.frombuffer(data, dtype=np.int8).astype(np.float32) * np.float32(scale)
    vec = np.frombuffer(data, dtype="<f4" if dtype == "float32" else "<f2").astype(np.float32)
    if not bool(np.all(np.isfinite(vec))):
        raise CodecError("CLS token contains NaN or Inf")
    return vec
