"""Projected CLS tokens (sparsat.node.wire.basis): each quantizer's round trip and exact bytes,
the basis as it travels (bounded parsing, its version), codes a quantizer never writes, and
batches of projected tokens, plain and zstd-compressed, at the wire size they are charged."""

from __future__ import annotations

import numpy as np
import pytest

from sparsat.node.data.config import ProjectionSpec
from sparsat.node.wire import basis as B
from sparsat.node.wire import downlink
from sparsat.node.wire.codec import CodecError
from sparsat.node.wire.rpc import GRPC_FRAME_BYTES
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

E = 48  # a small encoder width


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    """Tokens with a decaying spectrum, like an encoder's (a few directions carry most)."""
    mix = np.random.default_rng(0).normal(size=(E, E)).astype(np.float32)  # one distribution
    rng = np.random.default_rng(seed)
    return ((rng.normal(size=(n, E)) * np.exp(-np.arange(E) / 8)) @ mix.T + 0.5).astype(
        np.float32)


FIT = _tokens(2000)
HELD_OUT = _tokens(300, seed=1)

SPECS = {
    "int8-float32": ProjectionSpec(dim=12, quantizer="int8", scale="float32"),
    "int8-float16": ProjectionSpec(dim=12, quantizer="int8", scale="float16"),
    "int8-fixed": ProjectionSpec(dim=12, quantizer="int8", scale="fixed"),
    "int4-float16": ProjectionSpec(dim=12, quantizer="int4", scale="float16"),
    "int4-odd-dim": ProjectionSpec(dim=11, quantizer="int4", scale="float32"),
    "int4-fixed": ProjectionSpec(dim=12, quantizer="int4", scale="fixed"),
    "sign": ProjectionSpec(dim=13, quantizer="sign"),
    "pq": ProjectionSpec(dim=12, quantizer="pq", pq_bits=6),
}
CODE_BYTES = {"int8-float32": 12, "int8-float16": 12, "int8-fixed": 12, "int4-float16": 6,
              "int4-odd-dim": 6, "int4-fixed": 6, "sign": 2, "pq": 3}
SCALE_BYTES = {"int8-float32": 4, "int8-float16": 2, "int8-fixed": 0, "int4-float16": 2,
               "int4-odd-dim": 4, "int4-fixed": 0, "sign": 0, "pq": 0}


@pytest.fixture(scope="module", params=sorted(SPECS))
def fitted(request: pytest.FixtureRequest) -> tuple[str, B.Basis]:
    return request.param, B.fit(SPECS[request.param], FIT)


def test_each_quantizer_sends_the_bytes_it_says(fitted: tuple[str, B.Basis]) -> None:
    name, basis = fitted
    codes, scales = basis.encode(HELD_OUT)
    assert codes.shape == (len(HELD_OUT), CODE_BYTES[name]) and codes.dtype == np.uint8
    assert basis.code_bytes == CODE_BYTES[name] and basis.scale_bytes == SCALE_BYTES[name]
    if SCALE_BYTES[name] == 2:  # a float16 scale is exactly representable in float16
        assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
    assert np.isfinite(scales).all()


def test_each_quantizer_round_trips_within_its_step(fitted: tuple[str, B.Basis]) -> None:
    name, basis = fitted
    u = basis.project(HELD_OUT)
    codes, scales = basis.encode(HELD_OUT)
    got, bad = basis.decode(codes, scales)
    assert not bad.any()
    if basis.quantizer in ("int8", "int4"):
        qmax = B.QMAX[basis.quantizer]
        step = scales if basis.scale != "fixed" else np.full(len(u), basis.fixed_scale)
        inside = np.abs(u) <= qmax * step[:, None]  # a fixed scale clips past its range
        assert np.all(np.abs(got - u)[inside] <= step[:, None].repeat(basis.dim, 1)[inside] / 2
                      * (1 + 1e-5))
    elif basis.quantizer == "sign":
        assert np.array_equal(got > 0, u > 0)
        assert np.allclose(np.abs(got), basis.levels)
    else:  # every subspace decodes to its nearest centroid
        m, k, sub = basis.codebooks.shape
        parts = u.reshape(len(u), m, sub)
        for j in range(m):
            d = ((parts[:, j, None, :] - basis.codebooks[j][None]) ** 2).sum(axis=2)
            assert np.array_equal(codes[:, j], d.argmin(axis=1))
    # and back in the encoder's space, closer than the mean token is
    err = np.linalg.norm(basis.reconstruct(got) - HELD_OUT)
    assert err < np.linalg.norm(HELD_OUT - FIT.mean(axis=0))


def test_recode_is_encode_decode_reconstruct(fitted: tuple[str, B.Basis]) -> None:
    _, basis = fitted
    codes, scales = basis.encode(HELD_OUT)
    u, _ = basis.decode(codes, scales)
    assert np.array_equal(basis.recode(HELD_OUT), basis.reconstruct(u))


def test_the_basis_travels_whole_and_its_version_is_its_content(
        fitted: tuple[str, B.Basis]) -> None:
    _, basis = fitted
    msg = basis.to_pb()
    back = B.from_pb(pb.Basis.FromString(msg.SerializeToString()), E)
    assert back.version == basis.version == B.version_of(msg) != 0
    for a, b in ((back.components, basis.components), (back.mean, basis.mean),
                 (back.levels, basis.levels), (back.codebooks, basis.codebooks)):
        assert np.array_equal(a, b)
    assert np.array_equal(back.encode(HELD_OUT)[0], basis.encode(HELD_OUT)[0])
    # the uplink's sizes are what a TransmitRequest carrying them takes, and its frame
    dictionary = b"\x07" * 300
    sizes = B.uplink_sizes(msg, dictionary)
    carried = pb.TransmitRequest(basis=msg, dictionary=dictionary).ByteSize()
    assert sum(sizes.values()) == carried + GRPC_FRAME_BYTES
    assert sizes["dictionaries"] == 1 + 2 + 300
    assert (sizes["codebooks"] > 0) == (basis.quantizer == "pq")


def test_a_basis_whose_version_is_not_its_content_is_refused() -> None:
    msg = B.fit(SPECS["int4-float16"], FIT).to_pb()
    msg.components = bytes(len(msg.components))  # another basis under the old version
    with pytest.raises(CodecError, match="version"):
        B.from_pb(msg, E)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: setattr(m, "dim", 48), "components"),  # sizes checked before any allocation
    (lambda m: setattr(m, "dim", 4096), "dim 4096"),
    (lambda m: setattr(m, "embed_dim", 4097), "embed_dim"),
    (lambda m: setattr(m, "embed_dim", 47), "embed_dim"),
    (lambda m: setattr(m, "quantizer", "int3"), "unknown"),
    (lambda m: setattr(m, "version", 0), "version 0"),
    (lambda m: setattr(m, "mean", m.mean[:-4]), "mean"),
    (lambda m: setattr(m, "mean", b"\x00\x00\xc0\x7f" + m.mean[4:]), "NaN"),
])
def test_a_malformed_basis_is_refused_naming_what_is_wrong(edit: object, match: str) -> None:
    msg = B.fit(SPECS["int4-float16"], FIT).to_pb()
    edit(msg)  # type: ignore[operator]
    with pytest.raises(CodecError, match=match):
        B.from_pb(msg, E)


def test_pq_codebooks_must_be_what_their_bits_say() -> None:
    msg = B.fit(SPECS["pq"], FIT).to_pb()
    msg.pq_bits = 8  # 256 centroids claimed, 64 sent
    with pytest.raises(CodecError, match="codebooks"):
        B.from_pb(msg, E)


@pytest.mark.parametrize(("name", "corrupt"), [
    ("int4-float16", lambda c: c.__setitem__((0, 0), 0x08)),  # the nibble -8: never written
    ("int4-odd-dim", lambda c: c.__setitem__((0, 5), c[0, 5] | 0x10)),  # padding nibble set
    ("int8-float32", lambda c: c.__setitem__((0, 3), 0x80)),  # -128: never written
    ("sign", lambda c: c.__setitem__((0, 1), c[0, 1] | 0x80)),  # a padding bit set
    ("pq", lambda c: c.__setitem__((0, 2), 64)),  # an index past the 64 centroids
])
def test_codes_a_quantizer_never_writes_are_bad_alone(name: str, corrupt: object) -> None:
    basis = B.fit(SPECS[name], FIT)
    codes, scales = basis.encode(HELD_OUT[:4])
    corrupt(codes)  # type: ignore[operator]
    u, bad = basis.decode(codes, scales)
    assert bad.tolist() == [True, False, False, False]
    assert not u[0].any()


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_a_scale_that_is_not_finite_and_positive_is_bad(scale: float) -> None:
    basis = B.fit(SPECS["int8-float32"], FIT)
    codes, scales = basis.encode(HELD_OUT[:3])
    scales[1] = scale
    assert basis.decode(codes, scales)[1].tolist() == [False, True, False]


# ---- batches --------------------------------------------------------------------------------


def _payloads(basis: B.Basis, n: int) -> list[downlink.Payload]:
    codes, scales = basis.encode(_tokens(n, seed=2))
    return [downlink.projected_payload(3 * k + 1, k % 10, codes[k].tobytes(), float(scales[k]),
                                       basis.version) for k in range(n)]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_projected_batch_is_charged_its_exact_wire_size(name: str) -> None:
    basis = B.fit(SPECS[name], FIT)
    builder = downlink.BatchBuilder("sat-0", cls=True, basis=basis.version,
                                    scale_bytes=basis.scale_bytes)
    for p in _payloads(basis, 37):
        planned = builder.wire_size(p)
        builder.add(p)
        assert builder.wire_size() == planned
        msg = builder.to_pb()
        assert builder.wire_size() == msg.ByteSize() + GRPC_FRAME_BYTES
    assert len(msg.tokens) == 37 * basis.code_bytes
    assert len(msg.scales) == 37 * basis.scale_bytes
    back = downlink.pb_to_batch(pb.DownlinkBatch.FromString(msg.SerializeToString()), 1 << 20)
    assert back.basis == basis.version and back.tokens == msg.tokens


def test_a_zstd_batch_is_planned_at_its_bound_and_sent_compressed() -> None:
    import zstandard

    from sparsat.ground_station.uplink import train_dictionary

    basis = B.fit(SPECS["int4-fixed"], FIT)
    zdict = train_dictionary(basis, FIT, 1024)
    compressor = zstandard.ZstdCompressor(level=19, dict_data=zdict, write_content_size=True)
    builder = downlink.BatchBuilder("sat-0", cls=True, basis=basis.version,
                                    scale_bytes=basis.scale_bytes,
                                    zstd=(compressor, zdict.dict_id()))
    for p in _payloads(basis, 400):
        builder.add(p)
    msg = builder.to_pb()
    assert msg.dictionary == zdict.dict_id() and not msg.scales
    sent = msg.ByteSize() + GRPC_FRAME_BYTES
    assert sent <= builder.wire_size()  # planned at zstd's bound: never more than planned
    plain = downlink.BatchBuilder("sat-0", cls=True, basis=basis.version,
                                  scale_bytes=basis.scale_bytes)
    for p in builder.items:
        plain.add(p)
    raw = zstandard.ZstdDecompressor(dict_data=zdict).decompress(msg.tokens)
    assert raw == plain.to_pb().tokens  # what the frame holds: the tokens as they would go
    params = zstandard.get_frame_parameters(msg.tokens)
    assert params.content_size == len(raw) and params.dict_id == zdict.dict_id()


def test_a_batch_holds_the_tokens_of_one_basis() -> None:
    a, b = B.fit(SPECS["int4-float16"], FIT), B.fit(SPECS["int8-float16"], FIT)
    payloads = sorted(_payloads(a, 3) + [downlink.projected_payload(1000, 1, b"\x00" * 12, 1.0,
                                                                    b.version)],
                      key=lambda p: p.id)
    scale = {a.version: a.scale_bytes, b.version: b.scale_bytes}
    batches = downlink.pack(iter(payloads), lambda first, v: downlink.BatchBuilder(
        "s" if first else "", cls=True, basis=v, scale_bytes=scale[v]), 1 << 20, 1 << 20)
    assert [(x.basis, len(x.items)) for x in batches] == [(a.version, 3), (b.version, 1)]
    with pytest.raises(ValueError, match="basis"):
        batches[0].add(downlink.projected_payload(2000, 1, b"\x00" * 12, 1.0, b.version))


# ---- docs/tokens.md, implemented again from the page alone ------------------------------------


def _doc_encode(msg: pb.Basis, x: np.ndarray) -> tuple[bytes, bytes]:
    """A token's code and scale bytes from the Basis message, as docs/tokens.md says."""
    e, d = msg.embed_dim, msg.dim
    mean = np.frombuffer(msg.mean, "<f4")
    comps = np.frombuffer(msg.components, "<f2").astype(np.float32).reshape(d, e)
    u = (x.astype(np.float32) - mean) @ comps.T
    if msg.quantizer in ("int8", "int4"):
        qmax = 127 if msg.quantizer == "int8" else 7
        if msg.scale == "fixed":
            step, scale_bytes = np.float32(msg.fixed_scale), b""
        else:
            peak = np.abs(u).max()
            step = np.float32(peak / qmax if peak > 0 else 1.0)
            if msg.scale == "float16":
                step = np.float32(np.float16(min(max(step, 2.0 ** -14), 65504.0)))
                scale_bytes = np.float16(step).tobytes()
            else:
                scale_bytes = np.float32(step).tobytes()
        q = np.clip(np.rint(u / step), -qmax, qmax).astype(np.int64)
        if msg.quantizer == "int8":
            return bytes(int(v) & 0xFF for v in q), scale_bytes
        nib = [int(v) & 0xF for v in q] + ([0] if d % 2 else [])
        return bytes(nib[k] | nib[k + 1] << 4 for k in range(0, len(nib), 2)), scale_bytes
    if msg.quantizer == "sign":
        out = bytearray((d + 7) // 8)
        for i in range(d):
            if u[i] > 0:
                out[i // 8] |= 1 << (i % 8)
        return bytes(out), b""
    m, k = msg.pq_subspaces, 1 << msg.pq_bits
    books = np.frombuffer(msg.codebooks, "<f2").astype(np.float32).reshape(m, k, d // m)
    parts = u.reshape(m, d // m)
    return bytes(int(((books[j] - parts[j]) ** 2).sum(axis=1).argmin()) for j in range(m)), b""


def test_an_encoder_written_from_the_docs_makes_the_same_bytes(fitted: tuple[str, B.Basis]
                                                               ) -> None:
    import hashlib

    _, basis = fitted
    msg = basis.to_pb()
    body = pb.Basis()
    body.CopyFrom(msg)
    body.version = 0
    digest = hashlib.blake2b(body.SerializeToString(), digest_size=4).digest()
    assert msg.version == (int.from_bytes(digest, "little") & 0x7FFFFFFF or 1)
    codes, scales = basis.encode(HELD_OUT[:50])
    same = 0
    for k in range(50):  # float sums in another order (a batch, one token) move the last bit
        code, scale = _doc_encode(msg, HELD_OUT[k])
        wire = "<f4" if basis.scale_bytes == 4 else "<f2"
        if basis.scale_bytes:
            assert np.frombuffer(scale, wire)[0] == pytest.approx(scales[k], rel=1e-5)
        mine = np.frombuffer(scale, wire) if basis.scale_bytes else scales[k:k + 1]
        u_doc, bad = basis.decode(np.frombuffer(code, np.uint8)[None], mine)
        u_lib, _ = basis.decode(codes[k:k + 1], scales[k:k + 1])
        assert not bad.any()
        step = float(mine[0]) if basis.scale_bytes else basis.fixed_scale
        if basis.quantizer in ("int8", "int4"):  # at most one step apart, where it rounded
            assert np.abs(u_doc - u_lib).max() <= step * 1.001
        same += code == codes[k].tobytes()
    assert same >= 48  # the same bytes but for a rounding tie or two
