"""protobuf <-> plain Python for the ground station's own messages (the Mission service): the
only ground-station module that imports the generated messages (the node's serde modules,
sparsat.node.wire.{tensors,downlink,setup,jobs,control}, build the rest)."""

from __future__ import annotations

from dataclasses import asdict

from sparsat.ground_station.coordinator import EpochResult, WorkerBytes
from sparsat.ground_station.prepare import Update
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
        validation_accuracy=r.validation_accuracy or 0.0, validation_size=r.validation_size,
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
        validation_accuracy=float(m.validation_accuracy) if m.validation_size else None,
        validation_size=int(m.validation_size),
    )


def update_to_pb(update: Update) -> pb.Progress:
    return pb.Progress(**asdict(update))


def stats_reply(*, samples_stored: int, samples_received: int, duplicates: int, rejected: int,
                downlink_bytes_received: int, train_tokens: int, test_tokens: int,
                test_skipped: int, test_encode_flops: int, peak_rss_bytes: int,
                downlink_credential_bytes_received: int = 0, encoder_precision: str = "",
                encoder_precision_note: str = "", samples_arrived: int = 0,
                detector: tuple[int, int, int, int] = (0, 0, 0, 0)) -> pb.StatsReply:
    return pb.StatsReply(
        samples_stored=samples_stored, samples_received=samples_received,
        duplicates=duplicates, rejected=rejected,
        downlink_bytes_received=downlink_bytes_received, train_tokens=train_tokens,
        test_tokens=test_tokens, test_skipped=test_skipped,
        test_encode_flops=test_encode_flops, peak_rss_bytes=peak_rss_bytes,
        downlink_credential_bytes_received=downlink_credential_bytes_received,
        encoder_precision=encoder_precision, encoder_precision_note=encoder_precision_note,
        samples_arrived=samples_arrived, detector_usable_tokens=detector[0],
        detector_cloudy_tokens=detector[1], detector_false_positives=detector[2],
        detector_false_negatives=detector[3])


def arrived_reply(stamped: int) -> pb.ArrivedReply:
    return pb.ArrivedReply(stamped=stamped)


def arrived_request(satellite_id: str, transmit_id: int, batch_end_s: list[float]
                    ) -> pb.ArrivedRequest:
    return pb.ArrivedRequest(satellite_id=satellite_id, transmit_id=transmit_id,
                             batch_end_s=batch_end_s)


def mission_info(config_json: str, instance: str, prepared: bool, fingerprint: str,
                 rounds_done: int) -> pb.MissionInfo:
    """Describe's answer: the mission's keys (config_json, flattened: config.mission_keys)
    and their fingerprint, the process, and what a restart may have lost."""
    return pb.MissionInfo(config_json=config_json, instance=instance, prepared=prepared,
                          fingerprint=fingerprint, rounds_done=rounds_done)


# the Mission service's requests, as mission control sends them
def describe_request() -> pb.DescribeRequest:
    return pb.DescribeRequest()


def stats_request() -> pb.StatsRequest:
    return pb.StatsRequest()


def prepare_request(upto_s: float | None = None) -> pb.PrepareRequest:
    """The whole store (None), or a streaming update's: what arrived by upto_s."""
    if upto_s is None:
        return pb.PrepareRequest()
    return pb.PrepareRequest(stream=True, upto_s=upto_s)


def train_epoch_request(epoch: int, replay_share: float | None = None) -> pb.TrainEpochRequest:
    """An epoch over the whole dataset, or (replay_share given) a pass over the rows the last
    streaming Prepare added and that share of older ones."""
    if replay_share is None:
        return pb.TrainEpochRequest(epoch=epoch)
    return pb.TrainEpochRequest(epoch=epoch, new_rows_only=True, replay_share=replay_share)


def uplink_reply(basis: pb.Basis, dictionary: bytes, fit_tokens: int,
                 fit_s: float) -> pb.UplinkReply:
    return pb.UplinkReply(basis=basis, dictionary=dictionary, fit_tokens=fit_tokens,
                          fit_s=fit_s)


def uplink_request() -> pb.UplinkRequest:
    return pb.UplinkRequest()
