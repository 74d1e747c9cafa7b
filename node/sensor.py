"""Sensor node: one process hosting any number of satellites.

Each satellite owns a shard of the training split. When mission control grants it a byte
budget (Transmit), it masks its next images, builds their payloads (visible patches, or the
CLS token from its own encoder) and streams them to the ground station, which acks each one.
A sample stays queued until acked, so a failed or cut transfer is retried with the same
message (same sample_id, same mask) and the ground station's dedupe keeps the store exact.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator

import grpc
import numpy as np

from node import encoders, serde
from node.codec import encode_patches, masked_canvas, quantize_token
from node.config import SensorConfig
from node.datasets import ImageDataset, load_dataset
from node.masking import stable_seed, visible_indices
from node.rpc import ByteCounter, abort, bind, channel, make_server, register, wire_size
from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

log = logging.getLogger("sparsat.sensor")

CLS_BATCH = 64  # CLS payloads are encoded this many at a time
SEND_TIMEOUT_S = 60.0  # one Transmit's stream, at most TRANSMIT_MAX_SAMPLES samples


def exchange_bytes(msg: pb.Sample) -> int:
    """Link bytes of one sample and its ack (a duplicate's ack, the larger of the two)."""
    return wire_size(msg) + wire_size(pb.SampleAck(sample_id=msg.sample_id, duplicate=True))


def train_subset(n_train: int, subset: int | None, seed: int) -> np.ndarray:
    """The training indices a scenario uses: the first `subset` of a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[: subset if subset is not None else n_train])


def shard(indices: np.ndarray, sat_index: int, n_sats: int) -> np.ndarray:
    return indices[sat_index::n_sats]


def sample_id(dataset: str, split: str, index: int) -> str:
    return f"{dataset}/{split}/{index}"


class Satellite:
    def __init__(self, sat_id: str, indices: np.ndarray, seed: int = 0) -> None:
        self.sat_id = sat_id
        # `random` masks: a fresh draw per image, the same for the same seed and satellite
        # whichever process hosts it
        self.rng = np.random.default_rng(stable_seed(seed, "random", sat_id))
        self.pending: deque[int] = deque(int(i) for i in indices)
        self.built: dict[int, pb.Sample] = {}  # messages built and not yet acked
        self.lock = threading.Lock()


class SensorServicer(pb_grpc.SensorServicer, pb_grpc.HealthServicer):
    def __init__(self, node_id: str, satellite_ids: list[str], cfg: SensorConfig,
                 ground_station: str) -> None:
        unknown = [s for s in satellite_ids if s not in cfg.satellites]
        if unknown:
            raise ValueError(f"satellites {unknown} are not in the scenario ({cfg.satellites})")
        self.node_id = node_id
        self.cfg = cfg
        self.bytes = ByteCounter()
        self.dataset: ImageDataset = load_dataset(cfg.dataset, "train")
        self.grid = encoders.config(cfg.encoder).grid
        # patch payloads need only the token grid; the ViT is built when the sensor encodes
        self.encoder = (encoders.create(cfg.encoder, cfg.encoder_weights, cfg.encoder_seed,
                                        cfg.encoder_pooling)  # type: ignore[arg-type]
                        if cfg.payload == "cls" else None)
        subset = train_subset(len(self.dataset), cfg.train_subset, cfg.train_indices_seed)
        n = len(cfg.satellites)
        self.satellites = {
            s: Satellite(s, shard(subset, cfg.satellites.index(s), n), cfg.mask.seed)
            for s in satellite_ids
        }
        self.channel = channel(ground_station)
        self.downlink = pb_grpc.DownlinkStub(self.channel)

    # ---- payloads -------------------------------------------------------------------------

    def _build(self, sat: Satellite, indices: list[int]) -> None:
        grid = self.grid
        ids = [sample_id(self.cfg.dataset.name, "train", i) for i in indices]
        images = [self.dataset.image(i) for i in indices]
        vis = [visible_indices(self.cfg.mask, grid * grid, sid, sat.rng) for sid in ids]
        payloads: list[serde.PatchData | serde.ClsData]
        if self.cfg.payload == "patches":
            payloads = [encode_patches(im, grid, v) for im, v in zip(images, vis, strict=True)]
        else:
            assert self.encoder is not None
            canvases = [masked_canvas(im, grid, v) for im, v in zip(images, vis, strict=True)]
            tokens = self.encoder.encode_canvases(canvases, vis)
            payloads = []
            for tok in tokens:
                data, scale = quantize_token(tok, self.cfg.cls_dtype)
                payloads.append(serde.ClsData(data, self.cfg.cls_dtype, len(tok), scale))
        for i, sid, p in zip(indices, ids, payloads, strict=True):
            sample = serde.SampleData(sid, sat.sat_id, self.dataset.label(i), p)
            sat.built[i] = serde.sample_to_pb(sample)

    def _message(self, sat: Satellite, pos: int) -> pb.Sample:
        index = sat.pending[pos]
        if index not in sat.built:
            ahead = CLS_BATCH if self.cfg.payload == "cls" else 1
            todo = [i for i in list(sat.pending)[pos : pos + ahead] if i not in sat.built]
            self._build(sat, todo)
        return sat.built[index]

    # ---- RPCs ------------------------------------------------------------------------------

    def Transmit(self, request: pb.TransmitRequest,
                 context: grpc.ServicerContext) -> pb.TransmitReport:
        """Send whole samples (and room for their acks) within the byte budget.

        A failed stream is reported, not raised: the bytes already sent were spent, and the
        unacked samples stay queued, so mission control charges them and retries later.
        """
        sat = self.satellites.get(request.satellite_id)
        if sat is None:
            abort(context, grpc.StatusCode.NOT_FOUND,
                  f"{request.satellite_id!r} is not hosted by {self.node_id}")
        with sat.lock:
            batch: list[pb.Sample] = []
            budget = request.max_bytes
            while len(batch) < len(sat.pending) and (
                request.max_samples == 0 or len(batch) < request.max_samples
            ):
                msg = self._message(sat, len(batch))
                if exchange_bytes(msg) > budget:
                    break
                budget -= exchange_bytes(msg)
                batch.append(msg)
            report = pb.TransmitReport(satellite_id=sat.sat_id)
            if batch:
                self._send(sat, batch, report)
            report.remaining = len(sat.pending)
            report.next_bytes = exchange_bytes(self._message(sat, 0)) if sat.pending else 0
            return report

    def _send(self, sat: Satellite, batch: list[pb.Sample], report: pb.TransmitReport) -> None:
        acked_ids: set[str] = set()

        def counted() -> Iterator[pb.Sample]:
            for msg in batch:
                size = wire_size(msg)
                self.bytes.add(sent=size)
                report.message_bytes.append(size)
                yield msg

        try:
            # wait_for_ready: ride out a reconnect instead of failing at once
            for ack in self.downlink.Send(counted(), wait_for_ready=True,
                                          timeout=SEND_TIMEOUT_S):
                size = wire_size(ack)
                self.bytes.add(received=size)
                report.ack_bytes += size
                acked_ids.add(ack.sample_id)
                report.duplicates += int(ack.duplicate)
        except grpc.RpcError as e:
            report.error_code = e.code().value[0]
            report.error = str(e.details())
            log.warning("%s: downlink failed after %d acks: %s", sat.sat_id, len(acked_ids),
                        e.details())
        report.acked = len(acked_ids)
        done = {i for i, m in sat.built.items() if m.sample_id in acked_ids}
        sat.pending = deque(i for i in sat.pending if i not in done)
        for i in done:
            del sat.built[i]

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(node_id=self.node_id, role=pb.SENSOR, ready=True,
                              bytes_received=self.bytes.received, bytes_sent=self.bytes.sent)


def serve(listen: str, ground_station: str, satellite_ids: list[str],
          node_id: str | None = None) -> None:
    """Run a sensor host until interrupted: bind, register, then answer Transmit calls."""
    node_id = node_id or f"sensors-{satellite_ids[0]}"
    server = make_server()
    address = bind(server, listen)
    # Register first: the ground station answers with the scenario's sensor configuration.
    # Transmit calls only come after registration, once the server below is started.
    cfg = SensorConfig.from_json(register(ground_station, pb.RegisterRequest(
        node_id=node_id, role=pb.SENSOR, address=address, satellite_ids=satellite_ids)))
    servicer = SensorServicer(node_id, satellite_ids, cfg, ground_station)
    pb_grpc.add_SensorServicer_to_server(servicer, server)
    pb_grpc.add_HealthServicer_to_server(servicer, server)
    server.start()
    log.info("sensor host %s serving %s on %s", node_id, satellite_ids, address)
    server.wait_for_termination()
