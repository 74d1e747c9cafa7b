"""protobuf <-> plain Python for the ground station's own messages."""

from __future__ import annotations

from sparsat.ground_station.coordinator import EpochResult, WorkerBytes
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb


def _worker(w: WorkerBytes) -> pb.WorkerBytes:
    return pb.WorkerBytes(node_id=w.node_id, sent=w.sent, received=w.received, error=w.error,
                          flops=w.flops, wall_s=w.wall_s, rows=w.rows)


def epoch_to_pb(r: EpochResult) -> pb.EpochReport:
    return pb.EpochReport(
        epoch=r.epoch, accuracy=r.accuracy, test_loss=r.test_loss, train_loss=r.train_loss,
        dataset_bytes=[_worker(w) for w in r.dataset_bytes],
        rounds=[pb.RoundBytes(round=i, workers=[_worker(w) for w in ws])
                for i, ws in enumerate(r.rounds)],
        samples_trained=r.samples_trained, rounds_resumed=r.rounds_resumed,
        local_sgd_round_bytes=r.local_sgd_round_bytes, distinct_trained=r.distinct_trained,
        group_accuracy=r.group_accuracy, group_size=r.group_size,
    )


def pb_to_epoch(m: pb.EpochReport) -> EpochResult:
    def worker(w: pb.WorkerBytes) -> WorkerBytes:
        return WorkerBytes(w.node_id, int(w.sent), int(w.received), w.error, int(w.flops),
                           float(w.wall_s), int(w.rows))

    return EpochResult(
        epoch=int(m.epoch), accuracy=float(m.accuracy), test_loss=float(m.test_loss),
        train_loss=float(m.train_loss), dataset_bytes=[worker(w) for w in m.dataset_bytes],
        rounds=[[worker(w) for w in r.workers] for r in m.rounds],
        samples_trained=int(m.samples_trained), rounds_resumed=int(m.rounds_resumed),
        local_sgd_round_bytes=int(m.local_sgd_round_bytes),
        distinct_trained=int(m.distinct_trained), group_accuracy=dict(m.group_accuracy),
        group_size={k: int(v) for k, v in m.group_size.items()},
    )
