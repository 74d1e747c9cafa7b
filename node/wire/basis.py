"""Projected CLS tokens: a basis fitted on the ground, uplinked, and used on board.

A satellite with a basis sends a token x (the encoder's E values) as the codes of
u = C (x - mean), D values (D < E): C's rows are the projection's directions, each scaled to
unit variance on the data it was fitted on, so every dimension spends its bits alike. The
codes are one of

- int8: D bytes, values in [-127, 127], times a per-token scale (float32 or float16 on the
  wire) or the basis's fixed scale (no bytes);
- int4: ceil(D / 2) bytes, two's-complement nibbles in [-7, 7], low nibble first (-8 and a
  non-zero padding nibble are refused), scales as int8;
- sign: ceil(D / 8) bytes, bit d (LSB first) set where u_d > 0; dimension d decodes to
  +-levels[d] (the mean |u_d| of the fit); padding bits must be 0;
- pq: M bytes, each the index (< 2^bits) of the nearest of the 2^bits centroids of one of M
  equal subspaces (product quantization, codebooks trained with faiss).

The ground decodes codes to u, and u back to the encoder's space, x = mean + B u with B the
pseudo-inverse of C, so the classifier reads E values whatever the basis, and samples made
with different versions (or sent unprojected) are recoded through one basis before training.
A basis is what travels (to_pb / from_pb, float16 directions and codebooks): the ground uses
exactly what it uplinked. Its version is a digest of those bytes (never 0: 0 is "no basis").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from sparsat.node.data.config import (
    MAX_DIM,
    MAX_PQ_BITS,
    METHODS,
    QUANTIZERS,
    SCALES,
    ProjectionSpec,
)
from sparsat.node.wire.codec import CodecError
from sparsat.node.wire.downlink import field_bytes
from sparsat.node.wire.rpc import GRPC_FRAME_BYTES
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

QMAX = {"int8": 127, "int4": 7}
SCALE_BYTES = {"float32": 4, "float16": 2, "fixed": 0}
FIXED_QUANTILE = 0.999  # a fixed scale covers this share of the fit's |u| values; beyond: clipped
F16_MIN, F16_MAX = 2.0 ** -14, 65504.0  # float16 scales: normal, finite


def code_bytes(quantizer: str, dim: int, subspaces: int = 0) -> int:
    """Bytes of one token's codes."""
    return {"int8": dim, "int4": (dim + 1) // 2, "sign": (dim + 7) // 8,
            "pq": subspaces}[quantizer]


def scale_bytes(quantizer: str, scale: str) -> int:
    """Bytes of one token's scale on the wire (0: none, or the basis's fixed one)."""
    return SCALE_BYTES[scale] if quantizer in QMAX else 0


@dataclass(frozen=True, eq=False)
class Basis:
    version: int
    quantizer: str
    scale: str
    mean: np.ndarray  # (E,) float32
    components: np.ndarray  # (D, E) float32: u = components @ (x - mean)
    fixed_scale: float = 0.0  # scale "fixed": the step of every token
    levels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # sign: (D,)
    codebooks: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))
    method: str = "pca"

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def subspaces(self) -> int:
        return int(self.codebooks.shape[0])

    @property
    def code_bytes(self) -> int:
        return code_bytes(self.quantizer, self.dim, self.subspaces)

    @property
    def scale_bytes(self) -> int:
        return scale_bytes(self.quantizer, self.scale)

    @property
    def sample_bytes(self) -> int:
        """A token's bytes in a batch: its codes and its scale."""
        return self.code_bytes + self.scale_bytes

    def flops(self) -> int:
        """On board, per token: the projection (a D x E matrix-vector product and the
        centring) and, for PQ, the distances to every centroid."""
        d, e = self.components.shape
        pq = 3 * self.codebooks.shape[1] * d if self.quantizer == "pq" else 0
        return 2 * d * e + e + pq

    @property
    def back(self) -> np.ndarray:
        """(E, D): u back to the encoder's space (the pseudo-inverse of the components)."""
        cached = self.__dict__.get("_back")
        if cached is None:
            cached = np.linalg.pinv(self.components.astype(np.float64)).astype(np.float32)
            object.__setattr__(self, "_back", cached)
        return cached  # type: ignore[no-any-return]

    # ---- on board ---------------------------------------------------------------------------

    def project(self, tokens: np.ndarray) -> np.ndarray:
        x = np.asarray(tokens, np.float32).reshape(-1, self.embed_dim)
        return (x - self.mean) @ self.components.T  # type: ignore[no-any-return]

    def encode(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes (n, code_bytes) uint8, scales (n,) float32 as they travel; zeros where the
        quantizer sends none) of `tokens` (n, E)."""
        u = self.project(tokens)
        n = len(u)
        scales = np.zeros(n, np.float32)
        if self.quantizer in QMAX:
            qmax = QMAX[self.quantizer]
            if self.scale == "fixed":
                step = np.full(n, self.fixed_scale, np.float32)
            else:
                peak = (np.abs(u).max(axis=1) if u.size else np.zeros(n)).astype(np.float32)
                step = np.where(peak > 0, peak / np.float32(qmax), np.float32(1.0)).astype(
                    np.float32)  # in float32, as docs/tokens.md says
                if self.scale == "float16":
                    step = np.clip(step, F16_MIN, F16_MAX).astype(np.float16).astype(np.float32)
                scales = step
            q = np.clip(np.rint(u / step[:, None]), -qmax, qmax).astype(np.int8)
            if self.quantizer == "int8":
                return q.view(np.uint8).copy(), scales
            nib = (q.astype(np.int16) & 0xF).astype(np.uint8)
            if self.dim % 2:
                nib = np.pad(nib, ((0, 0), (0, 1)))
            return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8), scales
        if self.quantizer == "sign":
            return np.packbits(u > 0, axis=1, bitorder="little"), scales
        m, k, sub = self.codebooks.shape
        parts = u.reshape(n, m, sub)
        codes = np.empty((n, m), np.uint8)
        for j in range(m):  # nearest centroid per subspace
            cb = self.codebooks[j]
            dist = (parts[:, j, None, :] - cb[None]) ** 2
            codes[:, j] = dist.sum(axis=2).argmin(axis=1)
        return codes, scales

    # ---- on the ground ----------------------------------------------------------------------

    def decode(self, codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u (n, D) float32, bad (n,) bool) of codes (n, code_bytes) uint8 and their scales:
        a token whose codes the quantizer never writes (int4's -8 or a set padding nibble,
        a set padding bit, a PQ index past the codebook) or whose scale is not finite and
        positive is bad; its row of u is 0."""
        n, d = len(codes), self.dim
        bad = np.zeros(n, bool)
        if self.quantizer in QMAX:
            if self.scale == "fixed":
                step = np.full(n, self.fixed_scale, np.float32)
            else:
                step = np.asarray(scales, np.float32)
                bad |= ~(np.isfinite(step) & (step > 0))
            if self.quantizer == "int8":
                q = codes.view(np.int8).astype(np.float32)
                bad |= (codes == 0x80).any(axis=1)  # -128: never written
            else:
                lo, hi = codes & 0xF, codes >> 4
                nib = np.empty((n, 2 * codes.shape[1]), np.uint8)
                nib[:, 0::2], nib[:, 1::2] = lo, hi
                bad |= (nib[:, :d] == 8).any(axis=1)
                if d % 2:
                    bad |= nib[:, d] != 0
                q = np.where(nib[:, :d] > 7, nib[:, :d].astype(np.int16) - 16,
                             nib[:, :d]).astype(np.float32)
            u = q * np.where(bad, 0.0, step)[:, None]
        elif self.quantizer == "sign":
            bits = np.unpackbits(codes, axis=1, bitorder="little")
            bad |= bits[:, d:].any(axis=1)
            u = np.where(bits[:, :d] > 0, 1.0, -1.0).astype(np.float32) * self.levels
        else:
            m, k, sub = self.codebooks.shape
            bad |= (codes >= k).any(axis=1)
            idx = np.where(codes >= k, 0, codes).astype(np.int64)
            u = self.codebooks[np.arange(m)[None, :], idx].reshape(n, d)
        with np.errstate(over="ignore", invalid="ignore"):
            bad |= ~np.isfinite(u).all(axis=1)  # a finite scale times 127 may overflow
            u = np.where(bad[:, None], 0.0, u).astype(np.float32)
        return u, bad

    def reconstruct(self, u: np.ndarray) -> np.ndarray:
        """u (n, D) back in the encoder's space (n, E)."""
        return (self.mean + u @ self.back.T).astype(np.float32)  # type: ignore[no-any-return]

    def recode(self, tokens: np.ndarray) -> np.ndarray:
        """`tokens` (n, E) as the ground reads them once projected, quantized and sent with
        this basis: what the test split (and samples sent another way) go through."""
        codes, scales = self.encode(tokens)
        u, _ = self.decode(codes, scales)
        return self.reconstruct(u)

    # ---- the uplink -------------------------------------------------------------------------

    def to_pb(self) -> pb.Basis:
        msg = pb.Basis(version=self.version, quantizer=self.quantizer, scale=self.scale,
                       method=self.method, embed_dim=self.embed_dim, dim=self.dim,
                       mean=self.mean.astype("<f4").tobytes(),
                       components=self.components.astype("<f2").tobytes(),
                       fixed_scale=self.fixed_scale,
                       levels=self.levels.astype("<f4").tobytes())
        if self.quantizer == "pq":
            m, k, _ = self.codebooks.shape
            msg.pq_subspaces, msg.pq_bits = m, int(k).bit_length() - 1
            msg.codebooks = self.codebooks.astype("<f2").tobytes()
        return msg


def uplink_sizes(msg: pb.Basis, dictionary: bytes = b"") -> dict[str, int]:
    """What a TransmitRequest carrying basis `msg` and zstd `dictionary` puts on the uplink,
    by kind: each field (tag, length, content), the request's gRPC frame counted with the
    bases, the PQ codebooks' field apart from the rest of the basis."""
    books = field_bytes(len(msg.codebooks))
    return {"bases": field_bytes(msg.ByteSize()) - books + GRPC_FRAME_BYTES,
            "codebooks": books, "dictionaries": field_bytes(len(dictionary))}


def from_pb(msg: pb.Basis, embed_dim: int | None = None) -> Basis:
    """The Basis a message describes, every size checked against the others before anything
    is sized from it (a count from the wire is never trusted); CodecError names what is
    wrong. `embed_dim`: the encoder width the receiver expects."""
    e, d = int(msg.embed_dim), int(msg.dim)
    if msg.quantizer not in QUANTIZERS or msg.scale not in SCALES or msg.method not in METHODS:
        raise CodecError(f"basis: quantizer {msg.quantizer[:16]!r}, scale {msg.scale[:16]!r} "
                         f"or method {msg.method[:16]!r} unknown")
    if not (1 <= e <= MAX_DIM and 1 <= d <= e):
        raise CodecError(f"basis: dim {d} and embed_dim {e} out of 1 <= dim <= embed_dim <= "
                         f"{MAX_DIM}")
    if embed_dim is not None and e != embed_dim:
        raise CodecError(f"basis: embed_dim {e}, the encoder's tokens have {embed_dim}")
    if msg.version == 0:
        raise CodecError("basis: version 0 means no basis")
    if len(msg.mean) != 4 * e or len(msg.components) != 2 * d * e:
        raise CodecError(f"basis: mean of {len(msg.mean)} bytes and components of "
                         f"{len(msg.components)}, {e} x float32 and {d} x {e} float16 need "
                         f"{4 * e} and {2 * d * e}")
    mean = np.frombuffer(msg.mean, "<f4").astype(np.float32)
    comps = np.frombuffer(msg.components, "<f2").astype(np.float32).reshape(d, e)
    levels = np.zeros(0, np.float32)
    books = np.zeros((0, 0, 0), np.float32)
    if msg.quantizer == "sign":
        if len(msg.levels) != 4 * d:
            raise CodecError(f"basis: sign levels of {len(msg.levels)} bytes, {d} x float32 "
                             f"need {4 * d}")
        levels = np.frombuffer(msg.levels, "<f4").astype(np.float32)
    if msg.quantizer == "pq":
        m, bits = int(msg.pq_subspaces), int(msg.pq_bits)
        if not (1 <= m <= d and d % m == 0 and 1 <= bits <= MAX_PQ_BITS):
            raise CodecError(f"basis: pq_subspaces {m} must divide dim {d}, pq_bits {bits} "
                             f"in 1..{MAX_PQ_BITS}")
        if len(msg.codebooks) != 2 * (1 << bits) * d:
            raise CodecError(f"basis: codebooks of {len(msg.codebooks)} bytes, {m} x "
                             f"{1 << bits} x {d // m} float16 need {2 * (1 << bits) * d}")
        books = np.frombuffer(msg.codebooks, "<f2").astype(np.float32).reshape(
            m, 1 << bits, d // m)
    if msg.quantizer in QMAX and msg.scale == "fixed" and not (
            np.isfinite(msg.fixed_scale) and msg.fixed_scale > 0):
        raise CodecError(f"basis: fixed scale {msg.fixed_scale} is not finite and positive")
    for name, arr in (("mean", mean), ("components", comps), ("levels", levels),
                      ("codebooks", books)):
        if not np.isfinite(arr).all():
            raise CodecError(f"basis: {name} holds NaN or Inf")
    if msg.version != version_of(msg):
        raise CodecError(f"basis: version {msg.version} is not its content's "
                         f"({version_of(msg)})")
    return Basis(int(msg.version), msg.quantizer, msg.scale, mean, comps,
                 float(msg.fixed_scale), levels, books, msg.method)


def pb_basis(raw: bytes) -> pb.Basis:
    """A serialized Basis message (as a store keeps it) parsed."""
    return pb.Basis.FromString(raw)


def version_of(msg: pb.Basis) -> int:
    """A basis's version: 31 bits of a digest of everything in it but the version (0 never)."""
    body = pb.Basis()
    body.CopyFrom(msg)
    body.version = 0
    digest = hashlib.blake2b(body.SerializeToString(deterministic=True), digest_size=4)
    return (int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF) or 1


def as_sent(basis: Basis) -> Basis:
    """`basis` as the satellites get it: through its wire form (float16 directions and
    codebooks), with its version set from that content."""
    msg = basis.to_pb()
    msg.version = version_of(msg)
    return from_pb(msg)


# ---- fitting (the ground) ---------------------------------------------------------------------


def _finish(spec: ProjectionSpec, mean: np.ndarray, directions: np.ndarray, x: np.ndarray,
            seed: int) -> Basis:
    """Scale `directions` (D, E) to unit variance on x, fit the quantizer on the result."""
    rounded = directions.astype(np.float16).astype(np.float32)
    u = (x - mean) @ rounded.T
    sd = u.std(axis=0)
    comps = (rounded / np.where(sd > 0, sd, 1.0)[:, None]).astype(np.float32)
    comps = comps.astype(np.float16).astype(np.float32)  # what travels
    u = (x - mean) @ comps.T
    fixed, levels = 0.0, np.zeros(0, np.float32)
    books = np.zeros((0, 0, 0), np.float32)
    if spec.quantizer in QMAX:
        fixed = float(np.quantile(np.abs(u), FIXED_QUANTILE)) / QMAX[spec.quantizer] or 1.0
    elif spec.quantizer == "sign":
        levels = np.abs(u).mean(axis=0).astype(np.float32)
    else:
        books = fit_pq(u, spec.subspaces, spec.pq_bits, seed)
    basis = Basis(0, spec.quantizer, spec.scale, mean.astype(np.float32), comps, fixed,
                  levels, books, spec.method)
    return as_sent(basis)


def fit_pq(u: np.ndarray, subspaces: int, bits: int, seed: int) -> np.ndarray:
    """(M, 2^bits, D / M) codebooks, float16-rounded, trained with faiss's k-means (one
    thread: the same data gives the same codebooks)."""
    import faiss

    n, d = u.shape
    k = 1 << bits
    if n < k:
        raise ValueError(f"product quantization with {k} centroids needs at least {k} fit "
                         f"tokens, got {n}")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        pq = faiss.ProductQuantizer(d, subspaces, bits)
        pq.cp.seed = seed
        pq.cp.niter = 25
        pq.cp.min_points_per_centroid = 1  # a few thousand fit tokens are enough here
        pq.train(np.ascontiguousarray(u, np.float32))
        books = faiss.vector_to_array(pq.centroids).reshape(subspaces, k, d // subspaces)
    finally:
        faiss.omp_set_num_threads(threads)
    return books.astype(np.float16).astype(np.float32)


def fit_pca(spec: ProjectionSpec, x: np.ndarray, seed: int = 0) -> Basis:
    """The principal directions of unlabelled tokens x (n, E)."""
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        raise ValueError(f"a PCA basis needs at least 2 tokens, got {len(x)}")
    if spec.dim > x.shape[1]:
        raise ValueError(f"projection dim {spec.dim} exceeds the encoder's {x.shape[1]}")
    mean = x.mean(axis=0)
    vals, vecs = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    top = vecs[:, np.argsort(vals)[::-1][: spec.dim]].T
    top *= np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])[:, None]
    return _finish(spec, mean.astype(np.float32), top, x.astype(np.float32), seed)


def fit_supervised(spec: ProjectionSpec, x: np.ndarray, y: np.ndarray, seed: int = 0,
                   shrinkage: float = 0.05) -> Basis:
    """Directions from labelled tokens: the discriminant ones first (LDA, at most classes - 1,
    within-class scatter shrunk towards its mean variance), then the principal directions of
    what they leave, in the within-class-whitened space."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    e = x.shape[1]
    if spec.dim > e:
        raise ValueError(f"projection dim {spec.dim} exceeds the encoder's {e}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("a supervised basis needs samples of at least 2 classes")
    mean = x.mean(axis=0)
    xc = x - mean
    within = np.zeros((e, e))
    means = []
    for c in classes:
        part = xc[y == c]
        mu = part.mean(axis=0)
        means.append((len(part), mu))
        within += (part - mu).T @ (part - mu)
    within /= len(x)
    within = (1 - shrinkage) * within + shrinkage * np.trace(within) / e * np.eye(e)
    vals, vecs = np.linalg.eigh(within)
    white = vecs @ np.diag(vals ** -0.5) @ vecs.T  # within-class whitening (symmetric)
    between = sum(n * np.outer(mu @ white, mu @ white) for n, mu in means) / len(x)
    bvals, bvecs = np.linalg.eigh(between)
    k = min(spec.dim, len(classes) - 1)
    lda = bvecs[:, np.argsort(bvals)[::-1][:k]]
    z = xc @ white
    rest = z - (z @ lda) @ lda.T
    rvals, rvecs = np.linalg.eigh(np.cov(rest, rowvar=False))
    pcs = rvecs[:, np.argsort(rvals)[::-1][: spec.dim - k]]
    dirs = np.concatenate([lda, pcs], axis=1).T @ white  # (D, E) on centred x
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return _finish(spec, mean.astype(np.float32), dirs, x.astype(np.float32), seed)


def fit(spec: ProjectionSpec, x: np.ndarray, y: np.ndarray | None = None,
        seed: int = 0) -> Basis:
    if spec.method == "supervised":
        if y is None:
            raise ValueError("a supervised basis needs labels")
        return fit_supervised(spec, x, y, seed)
    return fit_pca(spec, x, seed)
