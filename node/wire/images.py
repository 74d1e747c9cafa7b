"""Image codecs for patch payloads (imagecodecs): PNG, WebP, JPEG, JPEG 2000 and JPEG XL.

A coded patch payload carries its visible-token code, then one coded image: the sample's
canvas (H, W, C) with the visible tiles in place and every hidden tile zero (what
sparsat.node.wire.codec.masked_canvas makes), coded whole, one image a sample. The ground
station decodes it and zeroes the hidden tiles again, so the encoder sees exactly what a raw
payload of the decoded pixels would show it.

Every decoder here is bounded before it runs: a stream's declared width, height, channels and
bit depth are read from its own header by the small parsers below and must be the sample's
shape, its length must be at most `max_coded_bytes`, and only the first frame of a stream is
decoded (WebP's simple formats only, JPEG XL and JPEG 2000 bare codestreams only). A stream
that declares anything else is refused (CodecError) before a decoder allocates for it.

Quality, by codec: PNG is lossless (no quality); WebP and JPEG take 1..100 (libwebp's and
libjpeg's); JPEG XL 1..100 (libjxl's quality, mapped to a Butteraugli distance); JPEG 2000 a
target PSNR in dB (OpenJPEG's distortion-ratio layer, the rate control imagecodecs exposes:
the bytes it takes are measured, not set). CCSDS 122/123, the space standards, have no Python
package here and are out of scope.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsat.node.data.config import ImageCodecSpec
from sparsat.node.wire.codec import (
    CodecError,
    check_tiles,
    decode_visible,
    encode_visible,
    masked_canvas,
)

HEADER_SLACK = 2048  # bytes a coded image may take beyond twice its raw pixels
JXL_EFFORT = 7  # libjxl's default effort, stated: the coding time depends on it


def max_coded_bytes(shape: tuple[int, int, int]) -> int:
    """The longest coded image accepted for a sample of `shape`: twice its raw pixels and a
    header's slack (every codec here codes a 28 x 28 image in well under its 784 raw bytes;
    JPEG's tables alone are ~600 B)."""
    return 2 * shape[0] * shape[1] * shape[2] + HEADER_SLACK


def _imagecodecs() -> Any:
    try:
        import imagecodecs
    except ImportError as e:  # a dependency of sparsat: only a broken install lacks it
        raise CodecError("image codecs need the imagecodecs package (pip install "
                         "imagecodecs)") from e
    return imagecodecs


def codec_version() -> str:
    """imagecodecs' version: what a coded image is, byte for byte, depends on it (and on the
    libraries it bundles, which a version of imagecodecs fixes)."""
    return str(_imagecodecs().__version__)


def encode_image(canvas: np.ndarray, spec: ImageCodecSpec) -> bytes:
    """One (H, W, C) uint8 canvas (C = 1 or 3) coded by `spec`."""
    if canvas.dtype != np.uint8 or canvas.ndim != 3 or canvas.shape[2] not in (1, 3):
        raise CodecError(f"a canvas must be uint8 (H, W, 1 or 3), got {canvas.dtype} "
                         f"{canvas.shape}")
    try:
        return _encode(canvas, spec)
    except CodecError:
        raise
    except Exception as e:  # each codec raises its own error class
        raise CodecError(f"{spec.name}: the canvas does not code: {str(e)[:120]}") from e


def _encode(canvas: np.ndarray, spec: ImageCodecSpec) -> bytes:
    ic = _imagecodecs()
    grey = canvas.shape[2] == 1
    a = np.ascontiguousarray(canvas[:, :, 0] if grey else canvas)
    q = spec.quality
    if spec.name == "png":
        return bytes(ic.png_encode(a, level=9))
    if spec.name == "webp":  # libwebp codes RGB(A) only: a grey canvas goes as R = G = B
        rgb = np.ascontiguousarray(np.repeat(canvas, 3, axis=2)) if grey else a
        return bytes(ic.webp_encode(rgb, level=q, lossless=False))
    if spec.name == "jpeg":
        return bytes(ic.jpeg8_encode(a, level=q))
    if spec.name == "jpeg2k":
        return bytes(ic.jpeg2k_encode(a, level=q, codecformat="j2k"))
    if spec.name == "jpegxl":
        return bytes(ic.jpegxl_encode(a, level=q, effort=JXL_EFFORT, usecontainer=False))
    raise CodecError(f"codec {spec.name!r} codes no image")


# ---- declared sizes: read from each stream's header before its decoder runs ----------------


def _u16be(b: bytes, at: int) -> int:
    return int.from_bytes(b[at : at + 2], "big")


def _u32be(b: bytes, at: int) -> int:
    return int.from_bytes(b[at : at + 4], "big")


def _png_size(b: bytes) -> tuple[int, int, int]:
    if len(b) < 33 or b[:8] != b"\x89PNG\r\n\x1a\n" or b[12:16] != b"IHDR":
        raise CodecError("not a PNG stream (signature and IHDR first)")
    width, height, depth, colour = _u32be(b, 16), _u32be(b, 20), b[24], b[25]
    channels = {0: 1, 2: 3}.get(colour)
    if depth != 8 or channels is None:
        raise CodecError(f"PNG: bit depth {depth}, colour type {colour}; 8-bit grey or RGB only")
    return height, width, channels


def _jpeg_size(b: bytes) -> tuple[int, int, int]:
    if b[:2] != b"\xff\xd8":
        raise CodecError("not a JPEG stream (no SOI marker)")
    pos = 2
    while pos + 4 <= len(b):
        if b[pos] != 0xFF:
            raise CodecError(f"JPEG: no marker at byte {pos}")
        marker, length = b[pos + 1], _u16be(b, pos + 2)
        # markers without a length (TEM, RSTn, SOI, EOI) and fill bytes before the frame
        # header: a decoder would read past them where this parser would not
        if marker in (0x00, 0x01, 0xFF) or 0xD0 <= marker <= 0xD9:
            raise CodecError(f"JPEG: marker 0x{marker:02X} before the frame header")
        if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive Huffman
            if pos + 10 > len(b) or length < 8:
                raise CodecError("JPEG: frame header cut short")
            precision, height, width, comps = b[pos + 4], _u16be(b, pos + 5), _u16be(
                b, pos + 7), b[pos + 9]
            if precision != 8 or comps not in (1, 3):
                raise CodecError(f"JPEG: {precision}-bit, {comps} components; 8-bit grey or "
                                 "colour only")
            return height, width, comps
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            raise CodecError(f"JPEG: frame type 0x{marker:02X} is not accepted")
        if marker == 0xDA or length < 2:
            break  # a scan before any frame header
        pos += 2 + length
    raise CodecError("JPEG: no frame header before the scan")


def _webp_size(b: bytes) -> tuple[int, int, int]:
    if len(b) < 30 or b[:4] != b"RIFF" or b[8:12] != b"WEBP":
        raise CodecError("not a WebP stream (RIFF/WEBP header)")
    if int.from_bytes(b[4:8], "little") != len(b) - 8:
        raise CodecError("WebP: the RIFF size is not the stream's")
    chunk = b[12:16]
    if chunk == b"VP8 ":
        if b[23:26] != b"\x9d\x01\x2a":
            raise CodecError("WebP: no VP8 start code")
        width = int.from_bytes(b[26:28], "little") & 0x3FFF
        height = int.from_bytes(b[28:30], "little") & 0x3FFF
        return height, width, 3
    if chunk == b"VP8L":
        if b[20] != 0x2F:
            raise CodecError("WebP: no VP8L signature")
        bits = int.from_bytes(b[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1, 3
    raise CodecError(f"WebP: chunk {chunk!r}; only the simple formats (VP8, VP8L) are "
                     "accepted (no VP8X: no animation, no extra chunks)")


def _j2k_size(b: bytes) -> tuple[int, int, int]:
    if len(b) < 42 or b[:4] != b"\xff\x4f\xff\x51":
        raise CodecError("not a JPEG 2000 codestream (SOC, SIZ first)")
    xsiz, ysiz, xo, yo = _u32be(b, 8), _u32be(b, 12), _u32be(b, 16), _u32be(b, 20)
    xt, yt, xto, yto = _u32be(b, 24), _u32be(b, 28), _u32be(b, 32), _u32be(b, 36)
    comps = _u16be(b, 40)
    if xo or yo or xto or yto or xt < xsiz or yt < ysiz:
        raise CodecError("JPEG 2000: one tile at the origin only (no offsets, no tiling)")
    if comps not in (1, 3) or len(b) < 42 + 3 * comps:
        raise CodecError(f"JPEG 2000: {comps} components; grey or colour only")
    for k in range(comps):
        ssiz, dx, dy = b[42 + 3 * k], b[43 + 3 * k], b[44 + 3 * k]
        if ssiz != 7 or dx != 1 or dy != 1:
            raise CodecError("JPEG 2000: 8-bit unsigned, unsubsampled components only")
    return ysiz, xsiz, comps


class _Bits:
    """JPEG XL's bit reader: least significant bit of each byte first."""

    def __init__(self, b: bytes) -> None:
        self.b, self.pos = b, 0

    def read(self, n: int) -> int:
        v = 0
        for k in range(n):
            byte = self.pos >> 3
            if byte >= len(self.b):
                raise CodecError("JPEG XL: size header cut short")
            v |= ((self.b[byte] >> (self.pos & 7)) & 1) << k
            self.pos += 1
        return v

    def u32(self, widths: tuple[int, int, int, int]) -> int:
        return self.read(widths[self.read(2)])


_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


def _jxl_size(b: bytes) -> tuple[int, int, int]:
    if b[:2] != b"\xff\x0a":
        raise CodecError("not a bare JPEG XL codestream (signature FF 0A; no container)")
    r = _Bits(b[2:16])
    small = r.read(1)
    ysize = (r.read(5) + 1) * 8 if small else r.u32((9, 13, 18, 30)) + 1
    ratio = r.read(3)
    if ratio:
        num, den = _JXL_RATIOS[ratio]
        xsize = ysize * num // den
    else:
        xsize = (r.read(5) + 1) * 8 if small else r.u32((9, 13, 18, 30)) + 1
    return ysize, xsize, 0  # channels: checked on the decoded image (bounded by the size)


_SIZES = {"png": _png_size, "jpeg": _jpeg_size, "webp": _webp_size, "jpeg2k": _j2k_size,
          "jpegxl": _jxl_size}


def declared_shape(data: bytes, name: str) -> tuple[int, int, int]:
    """(height, width, channels) a stream of codec `name` declares (channels 0: not in the
    header, JPEG XL); CodecError when its header is not one this module accepts."""
    return _SIZES[name](data)


def decode_image(data: bytes, spec: ImageCodecSpec, shape: tuple[int, int, int]) -> np.ndarray:
    """The (H, W, C) uint8 canvas a coded stream holds, refused (CodecError) unless it
    declares exactly `shape` (WebP: RGB for a grey canvas too) and is at most
    max_coded_bytes(shape) long."""
    height, width, channels = shape
    if not spec.coded:
        raise CodecError("raw patch payloads are not coded images")
    limit = max_coded_bytes(shape)
    if len(data) > limit:
        raise CodecError(f"{spec.name}: {len(data)} bytes, more than the {limit} a "
                         f"{height}x{width}x{channels} image may take")
    dh, dw, dc = declared_shape(data, spec.name)
    want_c = 3 if spec.name == "webp" else channels
    if (dh, dw) != (height, width) or dc not in (0, want_c):
        raise CodecError(f"{spec.name}: the stream declares {dh}x{dw}x{dc}, the sample is "
                         f"{height}x{width}x{channels}")
    ic = _imagecodecs()
    # decoded into an array of the sample's own shape: a decoder that reads another size
    # than the header parsed here refuses to write it (imagecodecs checks `out` before it
    # allocates), so what the wire says never sizes the decoder's output
    buf = np.empty((height, width, 3) if want_c == 3 else (height, width), np.uint8)
    try:
        if spec.name == "png":
            out = ic.png_decode(data, out=buf)
        elif spec.name == "webp":
            out = ic.webp_decode(data, hasalpha=False, out=buf)
        elif spec.name == "jpeg":
            out = ic.jpeg8_decode(data, out=buf)
        elif spec.name == "jpeg2k":
            out = ic.jpeg2k_decode(data, out=buf)
        else:
            out = ic.jpegxl_decode(data, index=0, out=buf)
    except Exception as e:  # each codec raises its own error class: all are bad payloads
        raise CodecError(f"{spec.name}: the stream does not decode: {str(e)[:120]}") from e
    out = np.asarray(out)
    if out.dtype != np.uint8:
        raise CodecError(f"{spec.name}: decoded {out.dtype}, expected uint8")
    if out.ndim == 2:
        out = out[:, :, None]
    if spec.name == "webp" and channels == 1 and out.shape[2:] == (3,):
        # a grey canvas sent as R = G = B: its grey is their mean (they differ by at most 1)
        out = ((out.astype(np.uint16).sum(axis=2, keepdims=True) + 1) // 3).astype(np.uint8)
    if out.shape != (height, width, channels):
        raise CodecError(f"{spec.name}: decoded {out.shape}, the sample is {shape}")
    return out


# ---- shared headers: what the shape and the settings fix, left off every sample ------------
# Each codec's stream is its header, a body, and a trailer. With `header: shared` a sample
# carries only the body: the header and trailer are made again on the ground from the
# sample's shape and the codec's settings (PNG's signature, IHDR and IEND, and its IDAT
# chunk's framing; WebP's RIFF and VP8 chunk headers, start code and size; JPEG's markers
# and tables through the scan header, and EOI; JPEG 2000's main header, its tile-part's SOT
# and SOD markers, and EOC). The satellite checks that its stream has exactly that header
# before it strips it, so what the ground rebuilds is, byte for byte, the stream coded.

_JPEG_EOI = b"\xff\xd9"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return (len(data).to_bytes(4, "big") + kind + data
            + zlib.crc32(kind + data).to_bytes(4, "big"))


def _png_head(shape: tuple[int, int, int]) -> bytes:
    ihdr = (shape[1].to_bytes(4, "big") + shape[0].to_bytes(4, "big")
            + bytes([8, 0 if shape[2] == 1 else 2, 0, 0, 0]))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)


def _webp_head(shape: tuple[int, int, int]) -> bytes:
    """The VP8 key frame's start code and size (after the 3-byte frame tag)."""
    return b"\x9d\x01\x2a" + shape[1].to_bytes(2, "little") + shape[0].to_bytes(2, "little")


_REFERENCE: dict[tuple[str, int, tuple[int, int, int]], bytes] = {}


def _reference_head(spec: ImageCodecSpec, shape: tuple[int, int, int]) -> bytes:
    """JPEG through its scan header, JPEG 2000's main header: what the encoder writes for
    every canvas of this shape at these settings (a blank canvas's, made once)."""
    key = (spec.name, spec.quality, shape)
    if key not in _REFERENCE:
        ref = encode_image(np.zeros(shape, np.uint8), spec)
        if spec.name == "jpeg":
            at = ref.index(b"\xff\xda")
            _REFERENCE[key] = ref[: at + 2 + _u16be(ref, at + 2)]
        else:
            _REFERENCE[key] = ref[: ref.index(b"\xff\x90")]
    return _REFERENCE[key]


def shared_head(spec: ImageCodecSpec, shape: tuple[int, int, int]) -> bytes:
    """The header bytes a shared JPEG / JPEG 2000 header puts before every body
    (SensorSetup.codec_header); b"" for the codecs whose shared header is the shape's."""
    if not spec.header_in_setup:
        return b""
    return _reference_head(spec, shape)


def strip_header(stream: bytes, spec: ImageCodecSpec, shape: tuple[int, int, int]) -> bytes:
    """The body of a coded canvas, its header and trailer left off (CodecError when the
    stream's header is not the one the ground would make: nothing is then left off)."""
    name = spec.name
    if name == "png":
        head = _png_head(shape)
        if not stream.startswith(head) or not stream.endswith(_png_chunk(b"IEND", b"")):
            raise CodecError("png: the stream's header is not the shared one")
        body, pos, end = [], len(head), len(stream) - 12
        while pos < end:
            n = int.from_bytes(stream[pos : pos + 4], "big")
            if stream[pos + 4 : pos + 8] != b"IDAT" or pos + 12 + n > end:
                raise CodecError("png: a chunk other than IDAT between IHDR and IEND")
            body.append(stream[pos + 8 : pos + 8 + n])
            pos += 12 + n
        return b"".join(body)
    if name == "webp":
        n = int.from_bytes(stream[16:20], "little")
        if (stream[:4] != b"RIFF" or stream[8:16] != b"WEBPVP8 " or stream[23:30] != _webp_head(
                shape) or 20 + n + (n & 1) != len(stream)):
            raise CodecError("webp: the stream's header is not the shared one")
        return stream[20:23] + stream[30 : 20 + n]
    if name == "jpeg":
        head = _reference_head(spec, shape)
        if not stream.startswith(head) or not stream.endswith(_JPEG_EOI):
            raise CodecError("jpeg: the stream's tables or frame are not the shared ones")
        return stream[len(head) : -2]
    if name == "jpeg2k":
        head = _reference_head(spec, shape)
        sot = len(head)
        if (not stream.startswith(head) or stream[sot : sot + 6] != b"\xff\x90\x00\x0a\x00\x00"
                or _u32be(stream, sot + 6) != len(stream) - sot - 2
                or stream[sot + 10 : sot + 14] != b"\x00\x01\xff\x93"
                or not stream.endswith(_JPEG_EOI)):
            raise CodecError("jpeg2k: the stream's main header or tile-part is not the shared one")
        return stream[sot + 14 : -2]
    raise CodecError(f"{name} has no shared header")


def join_header(body: bytes, spec: ImageCodecSpec, shape: tuple[int, int, int]) -> bytes:
    """The whole stream of a body sent with a shared header."""
    name = spec.name
    if name == "png":
        return _png_head(shape) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    if name == "webp":
        if len(body) < 3:
            raise CodecError("webp: a body shorter than its frame tag")
        vp8 = body[:3] + _webp_head(shape) + body[3:]
        pad = b"\0" if len(vp8) & 1 else b""
        return (b"RIFF" + (12 + len(vp8) + len(pad)).to_bytes(4, "little") + b"WEBPVP8 "
                + len(vp8).to_bytes(4, "little") + vp8 + pad)
    if name == "jpeg":
        return _reference_head(spec, shape) + body + _JPEG_EOI
    if name == "jpeg2k":
        head = _reference_head(spec, shape)
        return (head + b"\xff\x90\x00\x0a\x00\x00" + (14 + len(body)).to_bytes(4, "big")
                + b"\x00\x01\xff\x93" + body + _JPEG_EOI)
    raise CodecError(f"{name} has no shared header")


def encode_sent(canvas: np.ndarray, spec: ImageCodecSpec) -> bytes:
    """What a sample's coded canvas puts on the wire: the stream, or its body."""
    stream = encode_image(canvas, spec)
    shape = (canvas.shape[0], canvas.shape[1], canvas.shape[2])
    return strip_header(stream, spec, shape) if spec.header == "shared" else stream


def decode_sent(data: bytes, spec: ImageCodecSpec, shape: tuple[int, int, int]) -> np.ndarray:
    """The canvas of what a sample put on the wire (decode_image's bounds: a body longer
    than max_coded_bytes is refused before its header is made)."""
    if spec.header == "shared":
        if len(data) > max_coded_bytes(shape):
            raise CodecError(f"{spec.name}: {len(data)} bytes, more than the "
                             f"{max_coded_bytes(shape)} a {shape[0]}x{shape[1]}x{shape[2]} "
                             "image may take")
        data = join_header(data, spec, shape)
    return decode_image(data, spec, shape)


# ---- coded patch records: the visible-token code, then the coded canvas -------------------


def coded_record(image: np.ndarray, grid: int, visible: np.ndarray,
                 spec: ImageCodecSpec) -> tuple[bytes, bool]:
    """(record, is_runs) of one sample: its visible-token code, then its canvas (the visible
    tiles of `image`, hidden ones zero) coded by `spec`."""
    code, runs = encode_visible(visible, grid)
    return code + encode_sent(masked_canvas(image, grid, visible), spec), runs


def parse_coded_record(record: bytes, runs: bool, shape: tuple[int, int, int], grid: int,
                       spec: ImageCodecSpec) -> tuple[np.ndarray, np.ndarray]:
    """(canvas with the hidden tiles zero, visible indices) of a coded record, checked
    (CodecError names what is wrong)."""
    visible, n = decode_visible(record, runs, grid)
    if not len(visible):
        raise CodecError("no visible tokens")
    check_tiles(shape[0], shape[1], shape[2], grid, visible)
    canvas = decode_sent(record[n:], spec, shape)
    return masked_canvas(canvas, grid, visible), visible


def as_sent(image: np.ndarray, grid: int, visible: np.ndarray,
            spec: ImageCodecSpec) -> np.ndarray:
    """The canvas the ground station rebuilds from a sample sent through `spec` (the test
    split goes the same way as the training samples)."""
    canvas = masked_canvas(image, grid, visible)
    if not spec.coded:
        return canvas
    decoded = decode_image(encode_image(canvas, spec), spec, canvas.shape)
    return masked_canvas(decoded, grid, visible)
