"""What a mission counts: bytes per link, samples, compute, faults, history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Tally:
    downlink_bytes: int = 0  # batches and the Send streams' call credentials
    credential_bytes: int = 0  # of downlink_bytes: the call credentials (one per stream)
    downlink_messages: int = 0  # samples sent, retries included
    stored: int = 0  # samples the ground station stored (acked, not duplicate nor refused)
    downlink_batches: int = 0
    rejected: int = 0  # samples the ground station refused
    rejections: list[str] = field(default_factory=list)  # the first few, "id: reason"
    duplicates: int = 0
    trainer_bytes: int = 0
    per_round_bytes: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    per_link: dict[str, int] = field(default_factory=dict)
    downlink_done_s: float = 0.0
    uplink_bytes: int = 0  # BatchAcks, ground station -> satellites
    # projected payloads: what else went up (bases, codebooks, dictionaries: bytes), the
    # uplinks made, the windows (or slices) satellites let go by waiting for their basis, by
    # why, and the basis fitted
    uplink_content: dict[str, int] = field(default_factory=dict)
    uplinks: int = 0
    uplink_links: dict[str, int] = field(default_factory=dict)  # "uplink:SAT" -> bytes
    uplink_s: float = 0.0
    basis_waits: dict[str, int] = field(default_factory=dict)
    basis: dict[str, Any] = field(default_factory=dict)
    downlink_failures: int = 0
    trainer_failures: list[dict[str, Any]] = field(default_factory=list)
    local_sgd_round_bytes: int = 0  # what a local-SGD round of the same model would move
    wall_time_s: float = 0.0  # of earlier, interrupted runs of this mission
    resumed: int = 0
    retransmitted_bytes: int = 0  # radio frames sent again after a loss
    framing_bytes: int = 0  # the radio's frame headers, trailers and FEC (links.*.framing)
    stations: dict[str, dict[str, float]] = field(default_factory=dict)
    # adaptive modulation (links.downlink.budget.modcod): MODCOD -> the seconds on the air,
    # bytes on the air and transfers (one per Transmit) it carried
    modcods: dict[str, dict[str, float]] = field(default_factory=dict)
    cloudy_skipped: int = 0  # scenes the satellites dropped: no usable token
    rows_trained: int = 0  # rows trained on, all epochs (each row once an epoch)
    distinct_trained: int = 0  # distinct stored rows trained on
    # compute: FLOPs, seconds on the mission clock, measured wall seconds
    compute: dict[str, dict[str, float]] = field(default_factory=lambda: {
        k: {"flops": 0, "sim_s": 0.0, "wall_s": 0.0}
        for k in ("onboard_encoder", "ground_encoder", "trainers")})
    # on-board work besides the encoder (energy): image coding (and zstd) measured on the
    # sensor hosts, the pixels coded, and the FLOPs of tile choice and cloud detection
    coding_wall_s: float = 0.0
    coded_pixels: int = 0
    onboard_other_flops: int = 0
    radio_tx_s: float = 0.0  # the satellites' transmitters on the air: their batches' bits
    node_bytes: dict[str, dict[str, Any]] = field(default_factory=dict)  # at the last save
    # measured wall seconds of each stage (contacts: finding the contact windows)
    stage_wall_s: dict[str, float] = field(default_factory=lambda: {
        k: 0.0 for k in ("contacts", "downlink", "prepare", "training")})
    # faults survived, each with the node, its address and the wall seconds recovery took
    faults: list[dict[str, Any]] = field(default_factory=list)
    # satellites whose sensor host never came back: satellite -> host, address, undelivered
    shortfall: dict[str, dict[str, Any]] = field(default_factory=dict)
    gs_retries: int = 0  # ground-station calls retried after UNAVAILABLE
    # satellite -> samples still queued on board when the mission reached its horizon
    left_on_board: dict[str, int] = field(default_factory=dict)
    onboard_precision: list[str] = field(default_factory=list)  # what on-board encoders used
    fingerprint: str = ""  # of the scenario, as the ground station runs it
    # captures over time: satellite -> captured, dropped on board, sent, stored on the
    # ground, bytes on board at its last report
    captures: dict[str, dict[str, int]] = field(default_factory=dict)
    arrived: int = 0  # streaming: samples stamped with their arrival on the mission clock
    updates: int = 0  # streaming: model updates made

    def book_uplink(self, sat_id: str, sizes: dict[str, int]) -> None:
        """What the ground uplinked to one satellite, by kind (bases, dictionaries, the
        detector, a codec header...): in uplink_content and on its `uplink:SAT` link."""
        for kind, n in sizes.items():
            self.uplink_content[kind] = self.uplink_content.get(kind, 0) + n
        link = f"uplink:{sat_id}"  # results.json per_link_bytes
        self.uplink_links[link] = self.uplink_links.get(link, 0) + sum(sizes.values())

    @property
    def total_bytes(self) -> int:
        return (self.downlink_bytes + self.uplink_bytes + sum(self.uplink_content.values())
                + self.retransmitted_bytes
                + self.framing_bytes
                + self.trainer_bytes)
