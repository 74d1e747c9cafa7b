"""Sensor node: one process hosting any number of satellites.

Each satellite holds the training images the ground station named for it when the host
registered (RegisterReply.sensor), and sends them in that order. When mission control grants
it a byte budget (Transmit), it masks its next images (clouds drawn in, for natural masks),
builds their payloads (visible patches, or the CLS token from its own encoder) and streams
them to the ground station in batches sized to the budget, one ack per batch. With `random`
masks it queues one freshly masked copy of every image per epoch (all first copies, then all
second copies...). A scene that clouds leave with no usable token is dropped from the queue
and counted, never sent.
With a capture schedule (SensorConfig.capture, sparsat.node.data.capture) a satellite starts
empty: each Transmit names the mission time, and the host first makes every capture due by
then (image k mod n of the shard, revisit k // n: a new sample id with its own mask and
clouds), each into on-board storage: patch payloads are built at capture, CLS scenes wait raw
(H x W x C bytes) until encoded. A capture that does not fit drops the oldest waiting sample
(`drop_oldest`; never one sent and not yet acked) or itself (`drop_newest`), counted.
A sample stays queued until its batch is acked, so a failed or cut transfer is retried with
the same payload (same id, same mask) and the ground station's dedupe keeps the store exact; a
sample the ground station rejects is dropped from the queue and reported with its reason.
On the wire a sample is a compact id (copy * N + index into the N-image training split), its
label and its payload (sparsat.node.wire.downlink.Payload); the satellite is named once per
stream.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from sparsat.node.data.capture import CaptureSpec
from sparsat.node.data.config import SensorConfig, SensorSetup
from sparsat.node.data.datasets import ImageDataset, load_dataset
from sparsat.node.data.masking import capture, copy_id
from sparsat.node.data.sharding import sample_id
from sparsat.node.models import encoders
from sparsat.node.processes.rejoin import Rejoin
from sparsat.node.wire import basis as bases
from sparsat.node.wire import control, downlink, images, security
from sparsat.node.wire.codec import (
    CodecError,
    encode_patches,
    masked_canvas,
    quantize_token,
    tile_edges,
)
from sparsat.node.wire.rpc import (
    INSTANCE,
    ByteCounter,
    Outbox,
    abort,
    add_standard_services,
    bind,
    channel,
    make_server,
    register,
    register_reply,
    sized,
    wire_size,
)
from sparsat.node.wire.security import GROUND_STATION
from sparsat.node.wire.setup import pb_to_setup
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

log = logging.getLogger("sparsat.sensor")

CLS_BATCH = 64  # CLS payloads are encoded this many at a time
SEND_TIMEOUT_S = 60.0  # one Transmit's stream, at most TRANSMIT_MAX_SAMPLES samples
BATCH_BYTES = 64 * 1024  # default largest batch, its worst-case ack's room included
MAX_REJECTIONS = 16  # reasons reported per Transmit
# the largest ack of the largest batch: a bigger message is not parsed
MAX_ACK_WIRE_BYTES = downlink.max_ack_bytes(downlink.MAX_BATCH_SAMPLES)
SEND_METHOD = "/sparsat.v1.Downlink/Send"
MAX_UPLINK_BYTES = 1 << 20  # the largest TransmitRequest: a basis (D x E float16), codebooks


Key = tuple[int, int | None]  # (image index, copy): copy None unless masks are random


class Satellite:
    def __init__(self, sat_id: str, indices: np.ndarray, copies: int = 1,
                 capture: CaptureSpec | None = None) -> None:
        self.sat_id = sat_id
        self.shard = indices
        self.pending: deque[Key] = deque(
            () if capture is not None else
            ((int(i), c if copies > 1 else None) for c in range(copies) for i in indices))
        # captures over time: made so far, the last Transmit's mission time, what each waiting
        # sample takes on board, those sent and not yet acked (never dropped), counters since
        # the last report
        self.made = 0
        self.clock_s = 0.0
        self.sizes: dict[Key, int] = {}
        self.onboard_bytes = 0
        self.unacked: set[Key] = set()
        self.captured = 0
        self.dropped = 0
        self.built: dict[Key, downlink.Payload] = {}  # payloads built and not yet acked
        self.skipped = 0  # scenes with no usable token, not yet reported
        self.unusable: list[str] = []  # why images could not be encoded, not yet reported
        self.encode_flops = 0  # on-board encoding not yet reported
        self.encode_s = 0.0
        self.code_s = 0.0  # image coding (patch payloads with a codec) not yet reported
        self.coded_pixels = 0
        self.onboard_flops = 0  # tile choice and cloud detection, not yet reported
        # projected CLS payloads: the basis uplinked last (None: none yet), every one
        # uplinked (a batch sent with an older one may be resent), the zstd dictionary
        self.basis: bases.Basis | None = None
        self.bases: dict[int, bases.Basis] = {}
        self.zstd: tuple[Any, int] | None = None  # (ZstdCompressor, dictionary id)
        self.lock = threading.Lock()


class Grant:
    """A Transmit's byte grant as its stream goes. A batch goes out only when the bytes
    spent so far (batches, and the acks that came back, at their real size), the worst case
    (downlink.max_ack_bytes) of every ack still owed, the batch and its own worst-case ack fit
    the grant; so whatever the acks say, batches + acks never pass it. Batches stream without
    waiting for acks while the grant is far from spent; near its end the next batch waits for
    the acks owed (their real size is usually a few bytes) and is cut to the room left."""

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes  # neither spent nor reserved for an owed ack
        self.owed: deque[int] = deque()  # worst-case bytes of the acks still owed, in order
        self.sent: list[tuple[downlink.BatchBuilder, pb.DownlinkBatch]] = []  # handed to gRPC
        self.closed = False
        self.code_s = 0.0  # zstd-coded batches: the wall time their compression took
        self._cond = threading.Condition()

    def next(self, packer: downlink.Packer) -> pb.DownlinkBatch | None:
        """The next batch to send (waiting for owed acks while they may make room), or None:
        nothing left that fits, or the stream is over. Planned holding the lock, so once
        close() returns no payload is built any more."""
        with self._cond:
            while not self.closed:
                batch, cut = packer.plan(self.left)
                if (batch is not None and not cut) or not self.owed:
                    if batch is None:
                        return None
                    packer.take(batch)
                    worst = downlink.max_ack_bytes(len(batch.items))
                    t0 = time.thread_time()
                    msg = batch.to_pb()
                    if batch.zstd is not None:  # the batch's compression, on this thread
                        self.code_s += time.thread_time() - t0
                    self.left -= wire_size(msg) + worst
                    self.owed.append(worst)
                    self.sent.append((batch, msg))
                    return msg
                self._cond.wait()  # an ack owed: its real size may leave room for more
            return None

    def answered(self, size: int) -> None:
        """An ack of `size` wire bytes came back (for the oldest batch owed one)."""
        with self._cond:
            self.left += (self.owed.popleft() if self.owed else 0) - size
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def stream(self, first: pb.DownlinkBatch, packer: downlink.Packer
               ) -> Iterator[pb.DownlinkBatch]:
        """The request stream: `first`, then each next batch (gRPC pulls it on its thread)."""
        msg: pb.DownlinkBatch | None = first
        while msg is not None:
            yield msg
            msg = self.next(packer)


class SensorServicer(pb_grpc.SensorServicer, pb_grpc.HealthServicer):
    def __init__(self, node_id: str, cfg: SensorConfig, setup: SensorSetup,
                 ground_station: str, token_cache: Path | None = None) -> None:
        """A host for the satellites of `setup` (what the ground station told it, see
        from_reply), each queueing the images it was told, in that order."""
        self.node_id = node_id
        self.cfg = cfg
        self.setup = setup
        # on-board tokens of batches encoded before (simulations that repeat a mission)
        self.token_cache = token_cache
        self._encoder_key: str | None = None
        self.bytes = ByteCounter()
        self.dataset: ImageDataset = load_dataset(cfg.dataset, "train")
        self.grid = setup.grid
        # patch payloads need only the token grid; the ViT is built when the sensor encodes
        self.encoder = (encoders.create(cfg.encoder, cfg.encoder_weights, cfg.encoder_seed,
                                        cfg.encoder_pooling)  # type: ignore[arg-type]
                        if cfg.payload == "cls" else None)
        if self.encoder is not None:  # on-board encoding in the scenario's precision
            self.encoder.set_precision(cfg.encoder_precision)
        check_setup(setup, cfg, self.dataset,
                    self.encoder.cfg.grid if self.encoder is not None else None)
        self.satellites = {s: Satellite(s, held, setup.copies, cfg.capture)
                           for s, held in setup.images.items()}
        self.channel = channel(ground_station, peer=GROUND_STATION)
        # what each Send stream's call credentials put on the radio, before its first batch
        creds = security.active()
        self.credential_bytes = security.credential_bytes(creds.token) if creds else 0

    @classmethod
    def from_reply(cls, node_id: str, satellite_ids: list[str], reply: pb.RegisterReply,
                   ground_station: str, token_cache: Path | None = None) -> SensorServicer:
        """The host a registration reply describes; ValueError (CodecError) when the reply
        does not give every satellite in `satellite_ids` its images, or is malformed."""
        if not reply.HasField("sensor"):
            raise CodecError("the ground station's registration reply has no sensor setup "
                             "(RegisterReply.sensor): is it an older ground station?")
        setup = pb_to_setup(reply.sensor)
        missing = [s for s in satellite_ids if s not in setup.images]
        extra = [s for s in setup.images if s not in satellite_ids]
        if missing or extra:
            raise CodecError(f"the ground station's setup gives images to {list(setup.images)[:8]}"
                             f", not to the satellites registered {satellite_ids[:8]}")
        return cls(node_id, SensorConfig.from_json(reply.config_json), setup, ground_station,
                   token_cache)

    # ---- payloads -------------------------------------------------------------------------

    def _build(self, sat: Satellite, keys: list[Key]) -> None:
        grid = self.grid
        scenes = []  # (key, sample id, capture) of the scenes with something to send
        coded: dict[Key, tuple[bytes, bool]] = {}  # coded patch records, by scene
        t_code = 0.0
        for key in keys:
            sid = copy_id(sample_id(self.cfg.dataset.name, "train", key[0]), key[1])
            try:  # an image the codec cannot tile (smaller than the grid...) is dropped alone
                cap = capture(self.cfg.mask, self.dataset.image(key[0]), grid, sid)
                sat.onboard_flops += cap.onboard_flops  # tile choice, cloud detection
                if len(cap.visible) and self.cfg.payload == "patches" and self.cfg.codec.coded:
                    # this thread's CPU time: what coding took, not what the others did
                    t0 = time.thread_time()
                    coded[key] = images.coded_record(cap.image, grid, cap.visible,
                                                     self.cfg.codec)
                    t_code += time.thread_time() - t0
                elif len(cap.visible) and self.cfg.payload == "patches":
                    encode_patches(cap.image, grid, cap.visible)
                elif len(cap.visible):
                    masked_canvas(cap.image, grid, cap.visible)
            except (CodecError, ValueError) as e:
                reason = f"{sid}: unusable on board: {str(e)[:120]}"
                log.warning("%s: %s", sat.sat_id, reason)
                if len(sat.unusable) < MAX_REJECTIONS:
                    sat.unusable.append(reason)
                continue
            if len(cap.visible):
                scenes.append((key, sid, cap))
        if len(scenes) < len(keys):  # nothing to send: out of the queue, counted
            sat.skipped += len(keys) - len(scenes)
            for k in set(keys) - {key for key, _, _ in scenes}:
                sat.pending.remove(k)  # near the head: O(position)
                sat.onboard_bytes -= sat.sizes.pop(k, 0)
        caps = [cap for _, _, cap in scenes]
        ids = [key[0] + (key[1] or 0) * len(self.dataset) for key, _, _ in scenes]
        labels = [self.dataset.label(key[0]) for key, _, _ in scenes]
        if self.cfg.payload == "patches":
            with_shape = self.dataset.image_shape is None
            for key, i, y, c in zip([k for k, _, _ in scenes], ids, labels, caps, strict=True):
                if key in coded:  # an image codec: the record coded above
                    record, runs = coded[key]
                    sat.built[key] = downlink.Payload(
                        i, y, record, runs, shape=c.image.shape if with_shape else None)
                else:
                    sat.built[key] = downlink.patch_payload(
                        i, y, encode_patches(c.image, grid, c.visible), with_shape)
            if coded:
                sat.code_s += t_code
                sat.coded_pixels += sum(c.image.size for c in caps)
        else:
            assert self.encoder is not None
            t0 = time.perf_counter()
            canvases = [masked_canvas(c.image, grid, c.visible) for c in caps]
            tokens = self._encode(canvases, [c.visible for c in caps])
            sat.encode_s += time.perf_counter() - t0
            sat.encode_flops += sum(encoders.encode_flops(self.encoder.cfg, len(c.visible))
                                    for c in caps)
            b = sat.basis
            if b is not None:  # projected on board: codes of the uplinked basis
                t0 = time.perf_counter()
                codes, scales = b.encode(np.asarray(tokens))
                sat.encode_s += time.perf_counter() - t0
                sat.encode_flops += b.flops() * len(caps)
                for (key, _, _), i, y, c, sc in zip(scenes, ids, labels, codes, scales.tolist(),
                                                    strict=True):
                    sat.built[key] = downlink.projected_payload(i, y, c.tobytes(), sc, b.version)
            else:
                for (key, _, _), i, y, tok in zip(scenes, ids, labels, tokens, strict=True):
                    data, scale = quantize_token(tok, self.cfg.cls_dtype)
                    sat.built[key] = downlink.cls_payload(
                        i, y, downlink.ClsData(data, self.cfg.cls_dtype, len(tok), scale))
        if self.cfg.capture is not None:  # stored as its payload from now on
            for key, _, _ in scenes:
                size = stored_bytes(sat.built[key])
                sat.onboard_bytes += size - sat.sizes.get(key, 0)
                sat.sizes[key] = size

    def _encode(self, canvases: list[np.ndarray], visible: list[np.ndarray]) -> np.ndarray:
        """The on-board encoder's tokens of one batch; with a token cache (simulation speed
        only: what a batch encodes to depends on its canvases, their visible tokens and the
        encoder, all in the key) read from it when this batch was encoded before."""
        assert self.encoder is not None
        if self.token_cache is None:
            return self.encoder.encode_canvases(canvases, visible)
        if self._encoder_key is None:
            self._encoder_key = encoders.weights_digest(self.encoder)
        h = hashlib.blake2b(self._encoder_key.encode(), digest_size=16)
        for c, v in zip(canvases, visible, strict=True):
            h.update(np.asarray(c.shape, np.int64).tobytes())
            h.update(np.ascontiguousarray(c).tobytes())
            h.update(np.asarray(v, np.int64).tobytes())
        path = self.token_cache / f"onboard-{h.hexdigest()}.npy"
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape == (len(canvases), self.encoder.dim):
                return cached  # type: ignore[no-any-return]
        except (OSError, ValueError):
            pass
        tokens = self.encoder.encode_canvases(canvases, visible)
        self.token_cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.token_cache, prefix=".onboard-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, tokens)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tokens

    def _message(self, sat: Satellite, pos: int) -> downlink.Payload | None:
        """The payload at queue position `pos`, built when needed; None past the end."""
        while pos < len(sat.pending):
            key = sat.pending[pos]
            if key in sat.built:
                return sat.built[key]
            ahead = CLS_BATCH if self.cfg.payload == "cls" else 1
            todo = [k for k in itertools.islice(sat.pending, pos, pos + ahead)
                    if k not in sat.built]
            self._build(sat, todo)  # may drop cloudy scenes from the queue
        return None

    # ---- RPCs ------------------------------------------------------------------------------

    def Transmit(self, request: pb.TransmitRequest,
                 context: grpc.ServicerContext) -> pb.TransmitReport:
        """Send whole batches within the byte budget, batches and acks together (Grant).

        A failed stream is reported, not raised: the bytes already sent were spent, and the
        unacked samples stay queued, so mission control charges them and retries later.
        """
        sat = self.satellites.get(request.satellite_id)
        if sat is None:
            abort(context, grpc.StatusCode.NOT_FOUND,
                  f"{request.satellite_id!r} is not hosted by {self.node_id}")
        with sat.lock:
            report = control.transmit_report(sat.sat_id)
            if self.cfg.capture is not None:
                t = request.mission_time_s
                if not (math.isfinite(t) and t >= sat.clock_s):
                    abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          f"{sat.sat_id}: mission_time_s {t} is not a time at or after the "
                          f"last call's {sat.clock_s}")
                sat.clock_s = t
                self._capture(sat, self.cfg.capture, t)
            self._uplinked(sat, request, context)
            report.basis_version = sat.basis.version if sat.basis is not None else 0
            if self.setup.projected and sat.basis is None and not self.setup.send_unprojected:
                report.waiting_basis = True  # nothing leaves before the basis comes
            else:
                self._send(sat, request, report)
            head = self._message(sat, 0) if not report.waiting_basis else None
            report.remaining = len(sat.pending)
            report.next_bytes = (self._alone(sat, head, bool(request.transmit_id))
                                 if head is not None else 0)
            report.skipped, sat.skipped = sat.skipped, 0
            if report.sent:  # encoding is reported with the first samples it lets leave
                report.encode_flops, report.encode_s = sat.encode_flops, sat.encode_s
                sat.encode_flops, sat.encode_s = 0, 0.0
            # energy only (not on the mission clock): everything done since the last report
            report.code_s, report.coded_pixels = sat.code_s, sat.coded_pixels
            report.onboard_flops = sat.onboard_flops
            sat.code_s, sat.coded_pixels, sat.onboard_flops = 0.0, 0, 0
            if self.encoder is not None:
                report.encoder_precision = self.encoder.precision
            report.rejections.extend(sat.unusable[: MAX_REJECTIONS - len(report.rejections)])
            sat.unusable.clear()
            if self.cfg.capture is not None:
                report.captured, report.dropped = sat.captured, sat.dropped
                report.onboard_bytes = sat.onboard_bytes
                report.next_capture_s = (self.cfg.capture.next_capture_s(sat.made)
                                         if len(sat.shard) else -1.0)
                sat.captured, sat.dropped = 0, 0
            return report

    def _uplinked(self, sat: Satellite, request: pb.TransmitRequest,
                  context: grpc.ServicerContext) -> None:
        """Take what this contact uplinked: a basis (from now on every sample not yet sent
        is made with it: those built with another are made again), a zstd dictionary."""
        # the uplink is data, counted as received like the acks (mission control charges the
        # same: each field with its tag and length, and a gRPC frame)
        if request.HasField("basis") or request.dictionary:
            self.bytes.add(received=sum(bases.uplink_sizes(request.basis,
                                                           request.dictionary).values()))
        if (request.HasField("basis") or request.dictionary) and not self.setup.projected:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"{sat.sat_id}: a basis was uplinked, but this scenario's payloads are not "
                  "projected")
        zstd = None
        if request.dictionary:  # checked whole before anything changes
            import zstandard

            try:
                zdict = zstandard.ZstdCompressionDict(request.dictionary)
                dict_id = zdict.dict_id()
                level = self.cfg.projection.zstd_level if self.cfg.projection else 3
                compressor = zstandard.ZstdCompressor(level=level or 3, dict_data=zdict,
                                                      write_content_size=True,
                                                      write_checksum=False)
                compressor.compress(b"\0" * 64)  # a dictionary that loads but cannot code
            except zstandard.ZstdError as e:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"{sat.sat_id}: zstd dictionary: {e}")
            if not dict_id:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"{sat.sat_id}: zstd dictionary has no id (raw content)")
            zstd = (compressor, dict_id)
        if request.HasField("basis"):
            assert self.encoder is not None
            try:
                b = bases.from_pb(request.basis, self.encoder.dim)
            except CodecError as e:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{sat.sat_id}: {e}")
            if sat.basis is None or b.version != sat.basis.version:
                sat.basis = sat.bases[b.version] = b
                if self.cfg.capture is None:  # the scene is still there: made again with it
                    for key in [k for k, p in sat.built.items()
                                if p.basis != b.version and k not in sat.unacked]:
                        del sat.built[key]
                # with captures a stored token stays as it is (its scene is gone): it goes
                # with its own basis, or plain, which the ground station reads alike
        if zstd is not None:
            sat.zstd = zstd

    def _capture(self, sat: Satellite, spec: CaptureSpec, t: float) -> None:
        """Every capture due by mission time `t`, into storage under the policy."""
        n = len(sat.shard)
        due = spec.captured_by(t)
        while sat.made < due and n:
            k = sat.made
            sat.made += 1
            sat.captured += 1
            revisit = k // n
            key: Key = (int(sat.shard[k % n]), revisit or None)
            sat.pending.append(key)
            if self.cfg.payload == "patches":
                self._build(sat, [key])  # stored as its payload; one with nothing usable goes
                if key not in sat.built:
                    continue
            else:  # waits raw for the on-board encoder
                sat.sizes[key] = self.dataset.image(key[0]).nbytes
                sat.onboard_bytes += sat.sizes[key]
            self._make_room(sat, spec, key)

    def _make_room(self, sat: Satellite, spec: CaptureSpec, new: Key) -> None:
        """Storage over its bytes after capturing `new`: drop the oldest waiting samples
        never sent unacked (drop_oldest) until it fits, or `new` itself (drop_newest, or
        when it would not fit even with every such sample gone)."""
        over = sat.onboard_bytes - spec.storage_bytes
        if over <= 0:
            return
        kept = sat.sizes.get(new, 0) + sum(sat.sizes.get(k, 0) for k in sat.unacked)
        victims = [new]
        if spec.when_full == "drop_oldest" and kept <= spec.storage_bytes:
            victims, freed = [], 0
            for k in sat.pending:  # oldest first; stops as soon as enough is freed
                if freed >= over:
                    break
                if k != new and k not in sat.unacked:
                    victims.append(k)
                    freed += sat.sizes.get(k, 0)
        for victim in victims:
            sat.pending.remove(victim)  # near the head: O(position)
            sat.built.pop(victim, None)
            sat.onboard_bytes -= sat.sizes.pop(victim, 0)
            sat.dropped += 1

    def _builder(self, sat: Satellite, first: bool, transmit_id: int = 0, basis: int = 0
                 ) -> downlink.BatchBuilder:
        cls = self.cfg.payload == "cls"
        scale_bytes = sat.bases[basis].scale_bytes if basis else None
        return downlink.BatchBuilder(sat.sat_id if first else "", cls,
                                     cls and self.cfg.cls_dtype == "int8" and not basis,
                                     transmit_id if first else 0, basis, scale_bytes,
                                     sat.zstd if cls else None)

    def _alone(self, sat: Satellite, p: downlink.Payload, streaming: bool = False) -> int:
        """Link bytes of a stream carrying only `p`, and its ack (and its credentials; and,
        streaming, the largest transmit_id's bytes)."""
        tid = (1 << 62) - 1 if streaming else 0  # mission control's ids: below 2^62
        return (self.credential_bytes + self._builder(sat, True, tid, p.basis).wire_size(p)
                + downlink.max_ack_bytes(1))

    def _send(self, sat: Satellite, request: pb.TransmitRequest,
              report: pb.TransmitReport) -> None:
        """Stream the next queued samples in batches within the request's grant (no stream
        when not even one sample fits), then settle the queue with the acks."""
        queued = (self._message(sat, k) for k in itertools.count())
        packer = downlink.Packer(
            itertools.takewhile(lambda p: p is not None, queued),  # type: ignore
            lambda first, basis: self._builder(sat, first, request.transmit_id, basis),
            request.batch_bytes or BATCH_BYTES, request.max_samples)
        if request.max_bytes <= self.credential_bytes:
            return  # not even the stream's credentials fit
        grant = Grant(request.max_bytes - self.credential_bytes)
        first = grant.next(packer)
        if first is None:
            return
        acks: list[pb.BatchAck] = []
        outbox = Outbox(grant.stream(first, packer))
        # acks are charged as they arrived (sized), not as Python would re-encode them
        send = self.channel.stream_stream(SEND_METHOD,
                                          request_serializer=downlink.serialize_batch,
                                          response_deserializer=sized(
                                              downlink.parse_ack, MAX_ACK_WIRE_BYTES))
        try:
            # wait_for_ready: ride out a reconnect instead of failing at once
            call = send(iter(outbox), wait_for_ready=True, timeout=SEND_TIMEOUT_S)
            for ack, size in call:
                grant.answered(size)
                self.bytes.add(received=size)
                report.ack_bytes.append(size)
                n = len(grant.sent[len(acks)][0].items) if len(acks) < len(grant.sent) else 0
                if ack is None or size > downlink.max_ack_bytes(n):
                    # bigger than any ack of its batch can be: not read (nor parsed, past the
                    # largest batch's bound); its batch and the rest stay queued
                    report.error_code = grpc.StatusCode.INTERNAL.value[0]
                    report.error = (f"ground station sent an ack of {size} bytes, more than "
                                    f"the {downlink.max_ack_bytes(n)} an ack of {n} samples "
                                    "may be")
                    log.warning("%s: %s", sat.sat_id, report.error)
                    call.cancel()
                    break
                acks.append(ack)
        except grpc.RpcError as e:
            report.error_code = e.code().value[0]
            report.error = str(e.details())
            log.warning("%s: downlink failed after %d of %d batches: %s", sat.sat_id,
                        len(acks), len(grant.sent), e.details())
        finally:
            grant.close()  # the request stream builds no more, whatever gRPC's thread does
            sat.code_s += grant.code_s
        batches = [b for b, _ in grant.sent]
        # what went out: the batches whose write completed, and any acked (an ack proves it,
        # one not read too)
        for _, msg in grant.sent[: max(outbox.written, len(report.ack_bytes))]:
            size = wire_size(msg)
            self.bytes.add(sent=size)
            report.batch_bytes.append(size)
            report.sent += len(msg.ids)
        if report.batch_bytes:  # the credentials went out with the first batch written
            report.credential_bytes = self.credential_bytes
            self.bytes.add(sent=self.credential_bytes)
        done: set[int] = set()  # ids answered: stored, duplicate or rejected
        for batch, ack in zip(batches, acks, strict=False):
            try:
                answer = downlink.pb_to_ack(ack, len(batch.items))
            except CodecError as e:  # the batch stays queued: sent again, deduplicated
                report.error_code = grpc.StatusCode.INTERNAL.value[0]
                report.error = f"ground station sent a bad ack: {e}"
                continue
            done.update(p.id for p in batch.items)
            report.acked += len(batch.items)
            report.duplicates += len(answer.duplicates)
            report.rejected += len(answer.rejected)
            for pos, _, cause, reason in answer.rejected:
                why = f"{downlink.cause_name(cause)}: {reason}"
                if len(report.rejections) < MAX_REJECTIONS:
                    report.rejections.append(f"{batch.items[pos].id}: {why}")
                log.warning("%s: sample %d rejected: %s", sat.sat_id, batch.items[pos].id, why)
        if len(acks) > len(batches):
            report.error_code = grpc.StatusCode.INTERNAL.value[0]
            report.error = f"{len(acks)} acks for {len(batches)} batches"
        keys = [k for k, p in sat.built.items() if p.id in done]
        for k in keys:
            del sat.built[k]
            sat.onboard_bytes -= sat.sizes.pop(k, 0)
        gone = set(keys)
        sat.pending = deque(k for k in sat.pending if k not in gone)
        # sent and not acked: kept on board whatever storage needs, until an ack settles it
        # (every batch handed to gRPC: one whose write completed as the call failed may
        # have reached the ground)
        out = {p.id for b, _ in grant.sent for p in b.items}
        sat.unacked = {k for k in sat.unacked if k not in gone} | {
            k for k, p in sat.built.items() if p.id in out and p.id not in done}

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return control.health_reply(self.node_id, control.SENSOR, self.bytes.received,
                                    self.bytes.sent, INSTANCE)


def stored_bytes(p: downlink.Payload) -> int:
    """What a built payload takes in on-board storage: its data, and a token's scale (float32
    for int8 tokens and projected ones alike: an upper bound)."""
    return len(p.data) + (4 if p.scale else 0)


def check_setup(setup: SensorSetup, cfg: SensorConfig, dataset: ImageDataset,
                encoder_grid: int | None) -> None:
    """The setup the ground station sent agrees with this host's own dataset copy (whose
    pixels and labels it sends) and configuration; ValueError names the disagreement."""
    problems = []
    if len(dataset) != setup.n_train:
        problems.append(f"the training split here has {len(dataset)} images, the ground "
                        f"station's N is {setup.n_train}")
    if setup.payload != cfg.payload:
        problems.append(f"payload {setup.payload} in the setup, {cfg.payload} in the config")
    if setup.payload == "patches" and setup.codec != cfg.codec:
        problems.append(f"codec {setup.codec.label} in the setup, {cfg.codec.label} in the "
                        "config")
    if setup.payload == "cls" and setup.cls_dtype != cfg.cls_dtype:
        problems.append(f"cls_dtype {setup.cls_dtype} in the setup, {cfg.cls_dtype} in the "
                        "config")
    if encoder_grid is not None and encoder_grid != setup.grid:
        problems.append(f"the encoder's token grid is {encoder_grid}, the setup's {setup.grid}")
    shape = dataset.image_shape
    if (shape is not None and setup.codec_header
            and setup.codec_header != images.shared_head(cfg.codec, shape)):
        problems.append(f"the ground station's shared {cfg.codec.name} header is not the one "
                        f"this host's encoder writes (imagecodecs {images.codec_version()}): "
                        "shared headers need the same codec library on both ends, or "
                        "header: inline")
    if bool(setup.tile_rows) != (shape is not None):
        problems.append("tile edges given for images of several sizes, or missing for one "
                        "size")
    elif shape is not None and (
            setup.tile_rows != tuple(tile_edges(shape[0], setup.grid).tolist())
            or setup.tile_cols != tuple(tile_edges(shape[1], setup.grid).tolist())):
        problems.append(f"the setup's tile edges are not those of {shape[0]}x{shape[1]} "
                        f"images on a {setup.grid}x{setup.grid} grid")
    if problems:
        raise ValueError("the ground station's sensor setup does not fit this host: "
                         + "; ".join(problems))


def serve(listen: str, ground_station: str, satellite_ids: list[str],
          node_id: str | None = None, advertise: str | None = None,
          token_cache: Path | None = None) -> None:
    """Run a sensor host until interrupted: bind, register, then answer Transmit calls."""
    node_id = node_id or f"sensors-{satellite_ids[0]}"
    # Transmit and Health: small, but a Transmit may carry the uplink (basis, dictionary)
    server = make_server(max_request_bytes=MAX_UPLINK_BYTES)
    address = bind(server, listen, advertise, toward=ground_station)
    # Register first: the ground station answers with the scenario's sensor configuration
    # and each satellite's images.
    # Transmit calls only come after registration, once the server below is started.
    request = control.register_request(node_id, control.SENSOR, address,
                                       satellite_ids=satellite_ids)
    # its reply says which images each satellite sends, in which order (RegisterReply.sensor)
    reply = register_reply(ground_station, request)
    # a restarted ground station: register again (same id, same address) by ourselves; the
    # reply's instance is the process this registration is with
    Rejoin(node_id, ground_station, lambda wait_s: register(ground_station, request, wait_s),
           reply.instance).start()
    servicer = SensorServicer.from_reply(node_id, satellite_ids, reply, ground_station,
                                         token_cache)
    pb_grpc.add_SensorServicer_to_server(servicer, server)
    pb_grpc.add_HealthServicer_to_server(servicer, server)
    add_standard_services(server, ["sparsat.v1.Sensor", "sparsat.v1.Health"])
    server.start()
    log.info("sensor host %s serving %s on %s", node_id, satellite_ids, address)
    server.wait_for_termination()
