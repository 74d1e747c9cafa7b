"""Patch payloads through image codecs (issue 26): each codec's round trip and exact bytes,
bounded decoding of hostile streams, the setup and scenario fields, ingest, the energy
figures, and a mission whose lossless PNG payloads train exactly as raw ones do."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sparsat.node.data.config import ImageCodecSpec
from sparsat.node.wire import downlink
from sparsat.node.wire import images as im
from sparsat.node.wire.codec import CodecError, encode_visible, masked_canvas
from sparsat.node.wire.rpc import GRPC_FRAME_BYTES
from sparsat.node.wire.setup import pb_to_setup, setup_to_pb

GRID = 7
LOSSY = [("webp", 30), ("webp", 75), ("jpeg", 50), ("jpegxl", 30), ("jpegxl", 60),
         ("jpeg2k", 25), ("jpeg2k", 35)]
ALL = [("png", 0), *LOSSY]


def _image(seed: int = 0, shape: tuple[int, int, int] = (28, 28, 1)) -> np.ndarray:
    """A garment-like test image: a bright smooth blob with texture on a black background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    blob = 200 * np.exp(-(((y - shape[0] / 2) / 8) ** 2 + ((x - shape[1] / 2) / 6) ** 2))
    img = np.clip(blob[..., None] + rng.normal(0, 12, shape) * (blob[..., None] > 20), 0, 255)
    return img.astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10 * np.log10(255.0**2 / mse) if mse else float("inf")


@pytest.mark.parametrize("name,quality", ALL)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_codec_round_trips_the_canvas(name: str, quality: int, channels: int) -> None:
    spec = ImageCodecSpec(name, quality)
    img = _image(1, (28, 28, channels))
    visible = np.arange(0, 49, 2, dtype=np.uint16)
    canvas = masked_canvas(img, GRID, visible)
    data = im.encode_image(canvas, spec)
    assert im.declared_shape(data, name)[:2] == (28, 28)
    out = im.decode_image(data, spec, canvas.shape)
    assert out.shape == canvas.shape and out.dtype == np.uint8
    if name == "png":
        assert np.array_equal(out, canvas)  # lossless
    else:
        assert _psnr(out, canvas) > 20, _psnr(out, canvas)
    # a coded record is the visible code, then the image; its parse zeroes hidden tiles
    record, runs = im.coded_record(img, GRID, visible, spec)
    code, _ = encode_visible(visible, GRID)
    assert record == code + data
    rebuilt, vis = im.parse_coded_record(record, runs, canvas.shape, GRID, spec)
    assert np.array_equal(vis, visible)
    assert np.array_equal(rebuilt, masked_canvas(out, GRID, visible))
    assert np.array_equal(im.as_sent(img, GRID, visible, spec), rebuilt)


def test_higher_quality_costs_more_bytes_and_gives_a_closer_image() -> None:
    img = _image(2)
    for name, lo, hi in (("webp", 30, 75), ("jpegxl", 30, 60), ("jpeg2k", 25, 35)):
        a, b = (im.encode_image(img, ImageCodecSpec(name, q)) for q in (lo, hi))
        assert len(a) < len(b), name
        da, db = (im.decode_image(d, ImageCodecSpec(name, q), img.shape)
                  for d, q in ((a, lo), (b, hi)))
        assert _psnr(da, img) < _psnr(db, img), name


@pytest.mark.parametrize("name,quality", ALL)
def test_a_coded_batch_is_charged_its_exact_wire_size(name: str, quality: int) -> None:
    spec = ImageCodecSpec(name, quality)
    batch = downlink.BatchBuilder("sat-0")
    for k in range(6):
        img = _image(10 + k)
        visible = np.sort(np.random.default_rng(k).permutation(49)[: 10 + 5 * k]).astype(
            np.uint16)
        record, runs = im.coded_record(img, GRID, visible, spec)
        p = downlink.Payload(100 + 7 * k, k % 10, record, runs)
        before = batch.wire_size(p)
        batch.add(p)
        assert batch.wire_size() == before
    msg = batch.to_pb()
    assert batch.wire_size() == msg.ByteSize() + GRPC_FRAME_BYTES
    assert [len(r) for r in msg.patches] == [len(p.data) for p in batch.items]
    # coding is deterministic: the same canvas makes the same bytes
    assert im.encode_image(_image(10), spec) == im.encode_image(_image(10), spec)


def test_coded_images_are_smaller_than_raw_tiles_on_a_garment() -> None:
    img = _image(3)
    raw = img.size  # all 49 tiles, uint8
    sizes = {f"{n}{q}": len(im.encode_image(img, ImageCodecSpec(n, q))) for n, q in ALL}
    assert all(v < raw for k, v in sizes.items() if k != "jpeg50"), sizes  # JPEG's tables
    assert sizes["jpeg50"] > 300  # ~600 B of tables: per-image headers dominate small tiles


# ---- hostile streams: refused before a decoder allocates ----------------------------------


def _png_declaring(h: int, w: int) -> bytes:
    good = im.encode_image(_image(4), ImageCodecSpec("png"))
    return good[:16] + struct.pack(">II", w, h) + good[24:]


def _jpeg_declaring(h: int, w: int) -> bytes:
    good = bytearray(im.encode_image(_image(4), ImageCodecSpec("jpeg", 50)))
    at = good.index(b"\xff\xc0")
    good[at + 5 : at + 9] = struct.pack(">HH", h, w)
    return bytes(good)


def _webp_declaring(h: int, w: int) -> bytes:
    good = bytearray(im.encode_image(_image(4), ImageCodecSpec("webp", 50)))
    good[26:30] = struct.pack("<HH", w, h)
    return bytes(good)


def _j2k_declaring(h: int, w: int) -> bytes:
    good = bytearray(im.encode_image(_image(4), ImageCodecSpec("jpeg2k", 30)))
    good[8:16] = struct.pack(">II", w, h)
    good[24:32] = struct.pack(">II", w, h)
    return bytes(good)


def _jxl_declaring(h: int, w: int) -> bytes:
    # SizeHeader: small = 0, ysize - 1 in U32 selector 3 (30 bits), ratio 0, xsize likewise
    bits = [0, 1, 1] + [(h - 1) >> k & 1 for k in range(30)] + [0, 0, 0] + [1, 1] + [
        (w - 1) >> k & 1 for k in range(30)]
    packed = bytearray((len(bits) + 7) // 8)
    for k, b in enumerate(bits):
        packed[k >> 3] |= b << (k & 7)
    good = im.encode_image(_image(4), ImageCodecSpec("jpegxl", 60))
    return b"\xff\x0a" + bytes(packed) + good[2 + len(packed):]


DECLARING = {"png": _png_declaring, "jpeg": _jpeg_declaring, "webp": _webp_declaring,
             "jpeg2k": _j2k_declaring, "jpegxl": _jxl_declaring}
QUALITY = {"png": 0, "jpeg": 50, "webp": 50, "jpeg2k": 30, "jpegxl": 60}


@pytest.mark.parametrize("name", list(DECLARING))
def test_a_stream_declaring_a_huge_image_is_refused_before_decoding(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ImageCodecSpec(name, QUALITY[name])
    bomb = DECLARING[name](16_000, 16_000)
    assert im.declared_shape(bomb, name)[:2] == (16_000, 16_000)  # the parser reads it right
    ic = im._imagecodecs()
    for f in ("png_decode", "jpeg8_decode", "webp_decode", "jpeg2k_decode", "jpegxl_decode"):
        monkeypatch.setattr(ic, f, lambda *a, **k: pytest.fail("a decoder ran"))
    with pytest.raises(CodecError, match="declares 16000x16000"):
        im.decode_image(bomb, spec, (28, 28, 1))


@pytest.mark.parametrize("name", list(DECLARING))
def test_the_header_parsers_read_what_the_encoders_write(name: str) -> None:
    for shape in ((28, 28, 1), (20, 36, 3), (64, 9, 1)):
        data = im.encode_image(_image(5, shape), ImageCodecSpec(name, QUALITY[name]))
        h, w, c = im.declared_shape(data, name)
        assert (h, w) == shape[:2]
        assert c in (0, 3 if name == "webp" else shape[2])


@pytest.mark.parametrize("name", list(DECLARING))
def test_garbage_truncated_and_oversized_streams_are_codec_errors(name: str) -> None:
    spec = ImageCodecSpec(name, QUALITY[name])
    good = im.encode_image(_image(6), spec)
    rng = np.random.default_rng(0)
    cases = [b"", good[:10], good[: len(good) // 2], rng.bytes(len(good)),
             good[:40] + rng.bytes(len(good) - 40), good + b"\0" * im.max_coded_bytes(
                 (28, 28, 1))]
    for bad in cases:
        try:
            out = im.decode_image(bad, spec, (28, 28, 1))
        except CodecError:
            continue
        assert out.shape == (28, 28, 1)  # a decoder may tolerate a damaged body: bounded
    with pytest.raises(CodecError, match="more than"):
        im.decode_image(good + b"\0" * im.max_coded_bytes((28, 28, 1)), spec, (28, 28, 1))


def _jpeg_segments(b: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    pos, out = 2, []
    while True:
        m, n = b[pos + 1], struct.unpack(">H", b[pos + 2 : pos + 4])[0]
        out.append((m, b[pos : pos + 2 + n]))
        pos += 2 + n
        if m == 0xDA:
            return out, b[pos:]


def _jpeg_hiding_its_frame(h: int, w: int) -> bytes:
    """A JPEG whose real frame header (h x w) follows a TEM marker, a length-less marker a
    decoder skips, and whose 28 x 28 decoy sits in an APP1 segment a naive parser lands on
    (a read-only review's reproducer)."""
    segs, scan = _jpeg_segments(im.encode_image(np.zeros((28, 28, 1), np.uint8),
                                                ImageCodecSpec("jpeg", 50)))
    sof = next(s for m, s in segs if m == 0xC0)
    big = sof[:5] + struct.pack(">HH", h, w) + sof[9:]
    skip = 2 + len(big) + 4  # from the TEM's "length" to the decoy inside APP1
    app = b"\xff\xe1" + struct.pack(">H", 2 + len(sof)) + sof
    rest = b"".join(s for m, s in segs if m not in (0xC0, 0xE0))
    return b"\xff\xd8\xff\x01" + struct.pack(">H", skip) + big + app + rest + scan


def test_a_jpeg_hiding_a_huge_frame_behind_a_length_less_marker_is_refused() -> None:
    bomb = _jpeg_hiding_its_frame(30_000, 30_000)
    with pytest.raises(CodecError, match="marker 0x01 before the frame header"):
        im.decode_image(bomb, ImageCodecSpec("jpeg", 50), (28, 28, 1))


@pytest.mark.parametrize("name", list(DECLARING))
def test_a_decoder_that_disagrees_with_the_parser_writes_only_the_samples_shape(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a parser here might miss, the decoders write into an array of the sample's
    shape, which they check before they allocate: a stream of another size is refused."""
    import tracemalloc

    spec = ImageCodecSpec(name, QUALITY[name])
    bomb = (_jpeg_hiding_its_frame(8000, 8000) if name == "jpeg"
            else DECLARING[name](8000, 8000))
    monkeypatch.setitem(im._SIZES, name, lambda b: (28, 28, 0))  # a parser that is fooled
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="does not decode|decoded"):
            im.decode_image(bomb, spec, (28, 28, 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # an 8000 x 8000 image would be 64 MB (192 MB in RGB)


def test_extended_webp_and_jpeg_xl_containers_are_refused() -> None:
    vp8x = b"RIFF" + struct.pack("<I", 34) + b"WEBPVP8X" + b"\0" * 26
    with pytest.raises(CodecError, match="VP8X"):
        im.decode_image(vp8x, ImageCodecSpec("webp", 50), (28, 28, 1))
    box = b"\0\0\0\x0cJXL \r\n\x87\n" + b"\0" * 40
    with pytest.raises(CodecError, match="container"):
        im.decode_image(box, ImageCodecSpec("jpegxl", 60), (28, 28, 1))


def test_a_tiled_jpeg2000_stream_is_refused() -> None:
    good = bytearray(im.encode_image(_image(4), ImageCodecSpec("jpeg2k", 30)))
    good[24:32] = struct.pack(">II", 1, 1)  # 1 x 1 tiles: 784 of them
    with pytest.raises(CodecError, match="one tile"):
        im.decode_image(bytes(good), ImageCodecSpec("jpeg2k", 30), (28, 28, 1))


def test_a_stream_of_another_codec_is_refused() -> None:
    png = im.encode_image(_image(4), ImageCodecSpec("png"))
    for name in ("webp", "jpeg", "jpeg2k", "jpegxl"):
        with pytest.raises(CodecError, match="not a"):
            im.decode_image(png, ImageCodecSpec(name, QUALITY[name]), (28, 28, 1))


# ---- shared headers -------------------------------------------------------------------------

SHARED = [("png", 0), ("webp", 30), ("webp", 75), ("jpeg", 50), ("jpeg2k", 25)]


@pytest.mark.parametrize("name,quality", SHARED)
def test_a_shared_header_leaves_off_exactly_the_header_and_loses_nothing(
        name: str, quality: int) -> None:
    spec = ImageCodecSpec(name, quality, "shared")
    for shape, seed in (((28, 28, 1), 8), ((28, 28, 1), 9), ((20, 36, 3), 10)):
        canvas = _image(seed, shape)
        stream = im.encode_image(canvas, spec)
        body = im.encode_sent(canvas, spec)
        assert im.join_header(body, spec, shape) == stream  # byte for byte
        assert np.array_equal(im.decode_sent(body, spec, shape),
                              im.decode_image(stream, spec, shape))
        saved = len(stream) - len(body)
        if name == "png":  # signature, IHDR, IDAT's length/type/CRC, IEND
            assert saved == 8 + 25 + 12 + 12
        elif name == "webp":  # RIFF + WEBP, the VP8 chunk's header, start code and size
            assert saved == 12 + 8 + 7
        elif name == "jpeg":  # the tables through the scan header (~300 B), and EOI
            assert saved > 300
        else:  # the main header (~100 B), SOT and SOD, EOC
            assert saved > 100


def test_a_stream_whose_header_is_not_the_shared_one_is_not_stripped() -> None:
    canvas = _image(11)
    other = im.encode_image(canvas, ImageCodecSpec("jpeg", 70))
    with pytest.raises(CodecError, match="not the shared"):
        im.strip_header(other, ImageCodecSpec("jpeg", 50, "shared"), canvas.shape)
    png = im.encode_image(canvas, ImageCodecSpec("png"))
    with pytest.raises(CodecError, match="not the shared"):  # another size's IHDR
        im.strip_header(png, ImageCodecSpec("png", 0, "shared"), (28, 27, 1))


@pytest.mark.parametrize("name,quality", SHARED)
def test_hostile_bodies_under_a_shared_header_are_codec_errors(name: str, quality: int) -> None:
    spec = ImageCodecSpec(name, quality, "shared")
    body = im.encode_sent(_image(12), spec)
    rng = np.random.default_rng(1)
    for bad in (b"", body[:2], rng.bytes(len(body)), body[: len(body) // 2]):
        try:
            out = im.decode_sent(bad, spec, (28, 28, 1))
        except CodecError:
            continue
        assert out.shape == (28, 28, 1)
    with pytest.raises(CodecError, match="more than"):
        im.decode_sent(b"\0" * (im.max_coded_bytes((28, 28, 1)) + 1), spec, (28, 28, 1))


def test_a_shared_header_needs_a_codec_that_has_one() -> None:
    for name, q in (("raw", 0), ("jpegxl", 60)):
        with pytest.raises(ValueError, match="no header to share"):
            ImageCodecSpec(name, q, "shared")
    with pytest.raises(ValueError, match="header must be"):
        ImageCodecSpec("png", 0, "both")


# ---- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,quality,match", [
    ("bmp", 0, "one of"), ("webp", 0, "quality must be"), ("png", 50, "takes no quality"),
    ("jpeg2k", 99, "quality must be")])
def test_a_bad_codec_spec_names_what_is_wrong(name: str, quality: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageCodecSpec(name, quality)


def _setup(codec: ImageCodecSpec) -> Any:
    from sparsat.node.data.config import SensorSetup
    from sparsat.node.data.tiles import tile_edges

    edges = tuple(tile_edges(28, 7).tolist())
    return SensorSetup(n_train=10, grid=7, copies=1, payload="patches", cls_dim=0,
                       cls_dtype=None, tile_rows=edges, tile_cols=edges,
                       images={"sat-0": np.arange(3)}, codec=codec,
                       codec_header=im.shared_head(codec, (28, 28, 1)))


def test_the_setup_carries_the_codec_and_refuses_a_bad_one() -> None:
    for name, q in ALL:
        msg = setup_to_pb(_setup(ImageCodecSpec(name, q)))
        assert pb_to_setup(msg).codec == ImageCodecSpec(name, q)
    for name, q in SHARED:
        msg = setup_to_pb(_setup(ImageCodecSpec(name, q, "shared")))
        assert msg.codec_header_shared
        assert pb_to_setup(msg).codec == ImageCodecSpec(name, q, "shared")
        # JPEG and JPEG 2000 carry the header the ground station joins; PNG and WebP none
        assert bool(msg.codec_header) == (name in ("jpeg", "jpeg2k"))
        assert pb_to_setup(msg).codec_header == msg.codec_header
    msg = setup_to_pb(_setup(ImageCodecSpec("jpeg", 50, "shared")))
    msg.codec_header = b""
    with pytest.raises(CodecError, match="codec_header"):
        pb_to_setup(msg)
    msg = setup_to_pb(_setup(ImageCodecSpec("webp", 50, "shared")))
    msg.codec_header = b"x" * 10
    with pytest.raises(CodecError, match="codec_header"):
        pb_to_setup(msg)
    msg = setup_to_pb(_setup(ImageCodecSpec("webp", 50)))
    del msg.tile_rows[:], msg.tile_cols[:]  # images of several sizes: no codec
    with pytest.raises(CodecError, match="one image shape"):
        pb_to_setup(msg)
    msg = setup_to_pb(_setup(ImageCodecSpec("jpegxl", 60)))
    msg.codec_header_shared = True
    with pytest.raises(CodecError, match="no header to share"):
        pb_to_setup(msg)
    assert pb_to_setup(setup_to_pb(_setup(ImageCodecSpec()))).codec == ImageCodecSpec()
    msg = setup_to_pb(_setup(ImageCodecSpec("webp", 50)))
    msg.codec_quality = 0
    with pytest.raises(CodecError, match="webp quality"):
        pb_to_setup(msg)
    msg.codec = 99
    with pytest.raises(CodecError, match="not a known ImageCodec"):
        pb_to_setup(msg)


def test_the_scenario_validates_the_codec() -> None:
    from sparsat.sim.scenario.schema import Scenario

    def load(payload: dict[str, Any]) -> Scenario:
        return Scenario.model_validate({"name": "t", "sensors": {"payload": payload}})

    assert load({"kind": "patches", "codec": {"name": "webp", "quality": 30}})
    for payload, match in [({"kind": "patches", "codec": {"name": "webp"}}, "needs a quality"),
                           ({"kind": "patches", "codec": {"name": "png", "quality": 9}},
                            "takes no quality"),
                           ({"kind": "cls", "codec": {"name": "png"}}, "codec needs kind"),
                           ({"kind": "patches", "codec": {"name": "jpegxl", "quality": 30,
                                                          "header": "shared"}},
                            "no header to share")]:
        with pytest.raises(ValueError, match=match):
            load(payload)


def test_the_sensor_config_travels_with_its_codec() -> None:
    from sparsat.node.data.config import SensorConfig
    from sparsat.node.data.datasets import DatasetSpec
    from sparsat.node.data.masking import MaskSpec

    cfg = SensorConfig(DatasetSpec("fashion_mnist"), MaskSpec(), codec=ImageCodecSpec("jpegxl", 60))
    assert SensorConfig.from_json(cfg.to_json()) == cfg
    raw = SensorConfig(DatasetSpec("fashion_mnist"), MaskSpec())
    assert "codec" not in json.loads(raw.to_json())  # raw: the JSON of before
    assert SensorConfig.from_json(raw.to_json()) == raw


# ---- ingest ---------------------------------------------------------------------------------


def test_ingest_refuses_a_bad_coded_image_alone() -> None:
    from sparsat.ground_station.ingest import IngestRules, check_batch

    spec = ImageCodecSpec("webp", 50)
    rules = IngestRules(payload="patches", grid=GRID, dim=192, num_classes=10,
                        image_shape=(28, 28, 1), n_train=100, codec=spec)
    builder = downlink.BatchBuilder("sat-0")
    records = []
    for k in range(5):
        visible = np.arange(k, 49, 2, dtype=np.uint16)
        record, runs = im.coded_record(_image(20 + k), GRID, visible, spec)
        if k == 1:  # declares a 16000 x 16000 image
            code, _ = encode_visible(visible, GRID)
            record = code + _webp_declaring(16_000, 16_000)
        if k == 3:  # a PNG where the scenario codes WebP
            record = record[:7] + im.encode_image(_image(0), ImageCodecSpec("png"))
        if k == 4:  # a bitmap that sets no token
            record = bytes(7) + record[7:]
        records.append(record)
        builder.add(downlink.Payload(10 + k, k, record, runs))
    checked = check_batch(downlink.pb_to_batch(builder.to_pb(), rules.max_id), "sat-0",
                          rules, {"sat-0"})
    assert checked.positions == [0, 2]
    assert [r.data for r in checked.rows] == [records[0], records[2]]  # stored as sent
    causes = {pos: (cause, reason) for pos, _, cause, reason in checked.rejected}
    assert causes[1][0] == downlink.RejectCause.BAD_PIXELS and "16000x16000" in causes[1][1]
    assert causes[3][0] == downlink.RejectCause.BAD_PIXELS and "not a WebP" in causes[3][1]
    assert causes[4][0] == downlink.RejectCause.BAD_CODE


# ---- energy ---------------------------------------------------------------------------------


def test_energy_is_each_part_at_its_stated_rate() -> None:
    from sparsat.sim.mission.report import energy
    from sparsat.sim.mission.tally import Tally
    from sparsat.sim.scenario.schema import Scenario

    s = Scenario.model_validate({"name": "t", "sensors": {
        "mask": {"kind": "fixed", "ratio": 0.5, "choice": "content"},
        "payload": {"kind": "patches", "codec": {"name": "webp", "quality": 30}},
        "energy": {"joules_per_flop": 2e-11, "coding_watts": 3.0, "coding_slowdown": 4.0,
                   "radio_watts": 6.0}}})
    t = Tally()
    t.compute["onboard_encoder"]["flops"] = 5e9
    t.onboard_other_flops, t.coding_wall_s, t.coded_pixels = 10**9, 0.5, 784
    t.radio_tx_s = 12.5
    e = energy(s, t, 100)
    assert e["j"] == pytest.approx({"encoder": 0.1, "choice_and_detector": 0.02,
                                    "coding": 6.0, "radio": 75.0})
    assert e["total_j"] == pytest.approx(81.12)
    assert e["per_image_j"] == pytest.approx(0.8112)
    assert e["radio_s"] == 12.5 and e["coded_pixels"] == 784
    assert energy(s, t, 0)["per_image_j"] is None


# ---- a mission ------------------------------------------------------------------------------

TINY = {
    "name": "tiny-pixels",
    "seed": 3,
    "dataset": {"name": "fashion_mnist", "train_subset": 480, "test_subset": 300},
    "sensors": {"count": 2, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5},
                "payload": {"kind": "patches"}},
    "passes": {"period_s": 600, "duration_s": 60},
    "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05},
              "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
    "training": {"strategy": "ist", "workers": 2, "local_steps": 3, "epochs": 2,
                 "batch_size": 32, "hidden": [64, 48]},
}


def _run(tmp_path: Path, name: str, codec: dict[str, Any] | None) -> dict[str, Any]:
    from sparsat.sim.cli import main

    scenario = json.loads(json.dumps(TINY))
    if codec is not None:
        scenario["sensors"]["payload"]["codec"] = codec
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / name
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "results.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.slow
def test_png_trains_exactly_as_raw_and_webp_sends_fewer_bytes(tmp_path: Path) -> None:
    raw = _run(tmp_path, "raw", None)
    png = _run(tmp_path, "png", {"name": "png"})
    webp = _run(tmp_path, "webp", {"name": "webp", "quality": 30})
    shared = _run(tmp_path, "shared", {"name": "webp", "quality": 30, "header": "shared"})
    # a shared header: the same pixels arrive (the same training), 27 B a sample fewer sent
    assert [h["accuracy"] for h in shared["history"]] == [
        h["accuracy"] for h in webp["history"]]
    assert shared["bytes"]["downlink"] <= webp["bytes"]["downlink"] - 26 * 480
    # lossless: the same pixels reach the encoder, for the training and the test split
    assert [h["accuracy"] for h in png["history"]] == [h["accuracy"] for h in raw["history"]]
    for r in (png, webp):
        assert r["samples"]["stored"] == r["samples"]["sent"] == 480
        assert r["ground_station"]["downlink_bytes_received"] == r["bytes"]["downlink"]
        e = r["energy"]
        assert e["coded_pixels"] == 480 * 784 and e["coding_wall_s"] > 0
        assert e["j"]["coding"] > 0 and e["j"]["encoder"] == 0  # no encoder on board
    assert webp["bytes"]["downlink"] < 0.6 * raw["bytes"]["downlink"]
    # exact bytes: every batch the station recorded, rebuilt from its stored coded records
    # with the sensors' own builder, has the wire size recorded; their sum is the downlink
    from test_end_to_end import _stored_wire_bytes

    for name, r in (("png", png), ("webp", webp), ("shared", shared)):
        stored, wire = _stored_wire_bytes(tmp_path / name / "store")
        assert stored == 480
        assert wire + r["bytes"]["downlink_credentials"] == r["bytes"]["downlink"]
    assert raw["energy"]["coded_pixels"] == 0 and raw["energy"]["j"]["coding"] == 0
    # the radio's energy follows the air time of the satellites' batches: their bits at
    # the pass's 9,600 bit/s (the acks it receives are not counted)
    for r in (raw, png, webp):
        assert r["energy"]["radio_s"] == pytest.approx(8 * r["bytes"]["downlink"] / 9600)
    assert webp["energy"]["radio_s"] < raw["energy"]["radio_s"]


def _station(tmp_path: Path, spec: ImageCodecSpec, n: int) -> tuple[Any, Any, str, Any]:
    """(config, started server, address, registration reply) of a ground station whose one
    satellite sends n patch samples through `spec`."""
    from sparsat.ground_station.config import GroundStationConfig
    from sparsat.ground_station.server import GroundStation, build_server
    from sparsat.node.data.config import SensorConfig
    from sparsat.node.data.datasets import DatasetSpec
    from sparsat.node.data.masking import MaskSpec
    from sparsat.node.wire.rpc import channel
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
    from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

    cfg = GroundStationConfig(sensor=SensorConfig(
        dataset=DatasetSpec("fashion_mnist", download=False), mask=MaskSpec("fixed", 0.5),
        payload="patches", satellites=["sat-0"], train_subset=n, codec=spec),
        store_dir=tmp_path / "store")
    server, address = build_server(GroundStation(cfg), "127.0.0.1:0")
    server.start()
    with channel(address) as ch:
        reply = pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
            node_id="host", role=pb.SENSOR, address="127.0.0.1:1", satellite_ids=["sat-0"]),
            wait_for_ready=True, timeout=30)
    return cfg, server, address, reply


# ---- a sensor host against a real ground station ------------------------------------------


def test_a_sensor_host_sends_coded_samples_the_station_stores_and_reports_unusable_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import grpc

    from sparsat.node.processes.sensor import SensorServicer
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

    class Ctx:
        def abort(self, code: grpc.StatusCode, message: str) -> None:
            raise RuntimeError(f"{code}: {message}")

    spec = ImageCodecSpec("webp", 30, "shared")
    cfg, server, address, reply = _station(tmp_path, spec, 12)
    try:
        assert reply.sensor.codec == pb.IMAGE_CODEC_WEBP and reply.sensor.codec_header_shared
        assert not reply.sensor.codec_header  # WebP's follows from the shape
        host = SensorServicer.from_reply("host", ["sat-0"], reply, address)
        first = host.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**6,
                                                 max_samples=8), Ctx())
        # a library that made another header: the scene is refused on board, not sent
        real = im.strip_header
        calls = iter(range(100))

        def odd(stream: bytes, s: ImageCodecSpec, shape: tuple[int, int, int]) -> bytes:
            if next(calls) == 0:
                raise CodecError("webp: the stream's header is not the shared one")
            return real(stream, s, shape)

        monkeypatch.setattr(im, "strip_header", odd)
        rest = host.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**6),
                             Ctx())
    finally:
        server.stop(None)
    assert (first.acked, first.rejected, first.remaining) == (8, 0, 4)
    assert first.coded_pixels >= 8 * 784 and first.code_s > 0
    assert (rest.acked, rest.rejected, rest.remaining) == (3, 0, 0)
    assert any("unusable on board" in r and "not the shared one" in r for r in rest.rejections)
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        rows = db.execute("SELECT data, runs FROM payloads").fetchall()
    assert len(rows) == 11
    for data, runs in rows:  # what is stored decodes under the shared header
        im.parse_coded_record(bytes(data), bool(runs), (28, 28, 1), GRID, spec)


def test_a_host_whose_encoder_writes_another_shared_header_refuses_the_setup(
        tmp_path: Path) -> None:
    from sparsat.node.processes.sensor import SensorServicer

    spec = ImageCodecSpec("jpeg", 50, "shared")
    _, server, address, reply = _station(tmp_path, spec, 4)
    server.stop(None)
    head = reply.sensor.codec_header
    assert head == im.shared_head(spec, (28, 28, 1)) and head.startswith(b"\xff\xd8")
    SensorServicer.from_reply("host", ["sat-0"], reply, address)  # the same library: fine
    reply.sensor.codec_header = head[:-1] + bytes([head[-1] ^ 1])  # another library's
    with pytest.raises(ValueError, match="shared jpeg header is not the one"):
        SensorServicer.from_reply("host", ["sat-0"], reply, address)


def test_a_shared_jpeg_header_is_charged_to_every_satellites_uplink() -> None:
    from sparsat.sim.mission import pixels
    from sparsat.sim.mission.tally import Tally
    from sparsat.sim.scenario.schema import Scenario

    s = Scenario.model_validate({"name": "t", "sensors": {"count": 3, "payload": {
        "kind": "patches", "codec": {"name": "jpeg", "quality": 50, "header": "shared"}}}})
    n = len(im.shared_head(ImageCodecSpec("jpeg", 50, "shared"), (28, 28, 1)))
    assert pixels.header_bytes(s) == n > 300
    t = Tally()
    pixels.charge(s, t)
    assert t.uplink_content == {"codec_header": 3 * n}
    assert t.uplink_links == {f"uplink:sat-{k}": n for k in range(3)}
    webp = Scenario.model_validate({"name": "t", "sensors": {"payload": {
        "kind": "patches", "codec": {"name": "webp", "quality": 50, "header": "shared"}}}})
    assert pixels.header_bytes(webp) == 0


def test_energy_settings_that_change_nothing_are_refused() -> None:
    from sparsat.sim.scenario.schema import Scenario

    def load(sensors: dict[str, Any]) -> Scenario:
        return Scenario.model_validate({"name": "t", "sensors": sensors})

    raw = {"payload": {"kind": "patches"}}
    assert load({**raw, "energy": {"radio_watts": 2.0}})  # the radio always transmits
    with pytest.raises(ValueError, match="coding_watts and coding_slowdown have no effect"):
        load({**raw, "energy": {"coding_watts": 1.0}})
    with pytest.raises(ValueError, match="joules_per_flop has no effect"):
        load({**raw, "energy": {"joules_per_flop": 1e-12}})
    assert load({"payload": {"kind": "cls"}, "energy": {"joules_per_flop": 1e-12}})
    assert load({"payload": {"kind": "patches", "codec": {"name": "png"}},
                 "energy": {"coding_slowdown": 4.0}})


def test_a_report_with_impossible_energy_counts_is_refused() -> None:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
    from sparsat.sim.mission.hosts import report_error

    req = pb.TransmitRequest(satellite_id="sat-0", max_bytes=1000, max_samples=10)
    assert report_error(pb.TransmitReport(satellite_id="sat-0", code_s=0.5), req) == ""
    for bad in (dict(code_s=float("nan")), dict(code_s=-1.0), dict(coded_pixels=2**63),
                dict(onboard_flops=2**64 - 1)):
        assert report_error(pb.TransmitReport(satellite_id="sat-0", **bad), req), bad


def test_the_run_summary_prints_the_energy_an_image() -> None:
    from sparsat.sim.mission.report import _energy_line

    line = _energy_line({"per_image_j": 0.0875, "per_image": {
        "encoder": 0.0, "choice_and_detector": 2.5e-8, "coding": 0.0148, "radio": 0.0726}})
    assert line == ("energy on board 87.5 mJ/image  (choice and detector 2.5e-05, "
                    "coding 14.8, radio 72.6)")
    assert _energy_line({"per_image_j": None, "per_image": {}}) == "energy on board none stored"
