"""SimPy link and pass models: a point-to-point link that books every transfer's bytes and
air time, periodic passes, a link budget, frame loss."""

from __future__ import annotations

import math
import random
from collections.abc import Generator
from dataclasses import dataclass

import simpy


class Link:
    """A point-to-point link: one transfer at a time, rate in bit/s, fixed latency.

    A transfer of n bytes holds the link for latency + 8 n / rate seconds of mission time.
    """

    def __init__(self, env: simpy.Environment, name: str, rate_bps: float,
                 latency_s: float = 0.0) -> None:
        self.env = env
        self.name = name
        self.rate_bps = rate_bps
        self.latency_s = latency_s
        self.channel = simpy.Resource(env, capacity=1)
        self.bytes = 0
        self.busy_s = 0.0

    def duration(self, nbytes: int) -> float:
        return self.latency_s + 8.0 * nbytes / self.rate_bps

    def capacity(self, seconds: float) -> int:
        """Bytes that fit in one transfer of at most `seconds`."""
        return max(0, int((seconds - self.latency_s) * self.rate_bps / 8.0))

    def book(self, nbytes: int, seconds: float) -> None:
        """Charge `nbytes` on the air for `seconds` to the link (every transfer is booked
        here: this link's own, and a satellite's in a contact window, timed by the rate there)."""
        self.bytes += nbytes
        self.busy_s += seconds

    def transfer(self, nbytes: int) -> Generator[simpy.Event, object, None]:
        with self.channel.request() as req:
            yield req
            seconds = self.duration(nbytes)
            yield self.env.timeout(seconds)
            self.book(nbytes, seconds)


@dataclass(frozen=True)
class PeriodicPasses:
    """Contact windows [offset + n period, offset + n period + duration)."""

    period_s: float
    duration_s: float
    offset_s: float

    def window_at(self, t: float) -> tuple[float, float]:
        """The window containing t, or else the next one."""
        n = max(0, int((t - self.offset_s) // self.period_s))
        start = self.offset_s + n * self.period_s
        if t >= start + self.duration_s:
            start += self.period_s
        return start, start + self.duration_s


C_KM_S = 299_792.458
BOLTZMANN_DBW = -228.6  # 10 log10(k), dBW/(K Hz)


@dataclass(frozen=True)
class LinkBudget:
    """A simple downlink budget: free-space path loss -> SNR -> Shannon capacity, capped at
    the modem's rate. SNR = EIRP + G/T - FSPL - losses - k - 10 log10(B)."""

    frequency_hz: float
    eirp_dbw: float  # satellite transmitter power + antenna gain
    gt_dbk: float  # ground station figure of merit G/T
    bandwidth_hz: float
    modem_rate_bps: float  # the radio's maximum
    losses_db: float = 3.0  # atmosphere, pointing, polarisation, implementation

    def fspl_db(self, range_km: float) -> float:
        return 20 * math.log10(range_km) + 20 * math.log10(self.frequency_hz / 1e6) + 32.44

    def snr_db(self, range_km: float) -> float:
        return (self.eirp_dbw + self.gt_dbk - self.fspl_db(range_km) - self.losses_db
                - BOLTZMANN_DBW - 10 * math.log10(self.bandwidth_hz))

    # DVB-S2 adaptive modulation (modcod set): the MODCOD chosen at each call, or Shannon
    modcod: AdaptiveModcod | None = None

    def rate_and_mode(self, range_km: float) -> tuple[float, str | None]:
        """The rate at `range_km` and the MODCOD adaptive modulation picks for it ("none"
        when none closes; None for a Shannon-rate budget)."""
        snr_db = self.snr_db(range_km)
        if self.modcod is not None:
            rate, name = self.modcod.rate_and_mode(snr_db, self.bandwidth_hz)
            return min(self.modem_rate_bps, rate), name
        capacity = self.bandwidth_hz * math.log2(1 + 10 ** (snr_db / 10))
        return min(self.modem_rate_bps, capacity), None

    def rate_bps(self, range_km: float) -> float:
        return self.rate_and_mode(range_km)[0]

    def mode(self, range_km: float) -> str | None:
        return self.rate_and_mode(range_km)[1]


# DVB-S2 MODCODs (ETSI EN 302 307-1, Table 13: normal FECFRAMEs, AWGN, quasi error free):
# (name, ideal Es/N0 in dB, spectral efficiency in information bits per symbol). The
# efficiencies already include the LDPC/BCH code rate: nothing else charges the FEC.
DVB_S2 = (
    ("QPSK 1/4", -2.35, 0.490243), ("QPSK 1/3", -1.24, 0.656448),
    ("QPSK 2/5", -0.30, 0.789412), ("QPSK 1/2", 1.00, 0.988858),
    ("QPSK 3/5", 2.23, 1.188304), ("QPSK 2/3", 3.10, 1.322253),
    ("QPSK 3/4", 4.03, 1.487473), ("QPSK 4/5", 4.68, 1.587196),
    ("QPSK 5/6", 5.18, 1.654663), ("QPSK 8/9", 6.20, 1.766451),
    ("QPSK 9/10", 6.42, 1.788612), ("8PSK 3/5", 5.50, 1.779991),
    ("8PSK 2/3", 6.62, 1.980636), ("8PSK 3/4", 7.91, 2.228124),
    ("8PSK 5/6", 9.35, 2.478562), ("8PSK 8/9", 10.69, 2.646012),
    ("8PSK 9/10", 10.98, 2.679207), ("16APSK 2/3", 8.97, 2.637201),
    ("16APSK 3/4", 10.21, 2.966728), ("16APSK 4/5", 11.03, 3.165623),
    ("16APSK 5/6", 11.61, 3.300184), ("16APSK 8/9", 12.89, 3.523143),
    ("16APSK 9/10", 13.13, 3.567342), ("32APSK 3/4", 12.73, 3.703295),
    ("32APSK 4/5", 13.64, 3.951571), ("32APSK 5/6", 14.28, 4.119540),
    ("32APSK 8/9", 15.69, 4.397854), ("32APSK 9/10", 16.05, 4.453027),
)


@dataclass(frozen=True)
class AdaptiveModcod:
    """DVB-S2 adaptive coding and modulation: the symbol rate is bandwidth / (1 + rolloff),
    Es/N0 = C/N (the budget's SNR in the bandwidth) + 10 log10(1 + rolloff), and the MODCOD
    is the most efficient one whose threshold plus `margin_db` Es/N0 reaches; below every
    threshold the link carries nothing."""

    margin_db: float = 1.0
    rolloff: float = 0.2

    def es_n0_db(self, snr_db: float) -> float:
        return snr_db + 10 * math.log10(1 + self.rolloff)

    def choose(self, snr_db: float) -> tuple[str, float] | None:
        """(MODCOD, spectral efficiency) for a C/N of `snr_db`, None when none closes."""
        es_n0 = self.es_n0_db(snr_db)
        usable = [(eff, name) for name, need, eff in DVB_S2 if need + self.margin_db <= es_n0]
        if not usable:
            return None
        eff, name = max(usable)
        return name, eff

    def rate_and_mode(self, snr_db: float, bandwidth_hz: float) -> tuple[float, str]:
        """The symbol rate times the chosen MODCOD's efficiency, and its name; (0, "none")
        when none closes."""
        chosen = self.choose(snr_db)
        if chosen is None:
            return 0.0, "none"
        return bandwidth_hz / (1 + self.rolloff) * chosen[1], chosen[0]


@dataclass(frozen=True)
class Framing:
    """The radio's own framing around the gRPC bytes: each frame carries `payload_bytes` of
    them between `header_bytes` and `trailer_bytes`, and the whole goes through a FEC code of
    rate `fec_rate` (1: none). AX.25 UI frames with a CSP header on UHF; CCSDS TM transfer
    frames with their attached sync marker and a Reed-Solomon or LDPC code on S-band."""

    payload_bytes: int
    header_bytes: int
    trailer_bytes: int
    fec_rate: float = 1.0

    def frames(self, nbytes: int) -> int:
        return -(-nbytes // self.payload_bytes) if nbytes > 0 else 0

    def on_air(self, nbytes: int) -> int:
        """Bytes on the air to carry `nbytes`: whole frames' overhead, then the FEC's."""
        framed = nbytes + self.frames(nbytes) * (self.header_bytes + self.trailer_bytes)
        return math.ceil(framed / self.fec_rate) if framed else 0

    def send(self, nbytes: int, loss: float, rng: random.Random) -> tuple[int, int]:
        """(gRPC bytes on the air, all bytes on the air) to deliver `nbytes` when each frame
        is lost with probability `loss` and resent until it arrives: every copy of a frame
        is charged with its header, trailer and FEC."""
        sent, copies = _frame_copies(nbytes, self.payload_bytes, loss, rng)
        framed = sent + copies * (self.header_bytes + self.trailer_bytes)
        return sent, math.ceil(framed / self.fec_rate) if framed else 0

    @property
    def efficiency(self) -> float:
        """gRPC bytes per byte on the air, full frames."""
        per = self.payload_bytes + self.header_bytes + self.trailer_bytes
        return self.payload_bytes / per * self.fec_rate


def retransmitted(nbytes: int, loss: float, frame_bytes: int, rng: random.Random) -> int:
    """Bytes on the air to deliver `nbytes` in frames of `frame_bytes` when each frame is
    lost with probability `loss` and resent until it arrives (every copy is charged)."""
    if loss <= 0 or nbytes <= 0:
        return nbytes
    return _frame_copies(nbytes, frame_bytes, loss, rng)[0]


def _frame_copies(nbytes: int, frame_bytes: int, loss: float, rng: random.Random
                  ) -> tuple[int, int]:
    """(bytes, frames) sent to deliver `nbytes` in frames of `frame_bytes`, each lost with
    probability `loss` and resent until it arrives (no draw at all when loss is 0)."""
    frames = -(-nbytes // frame_bytes) if nbytes > 0 else 0
    sent = copies = 0
    for i in range(frames):
        size = frame_bytes if i < frames - 1 else nbytes - frame_bytes * (frames - 1)
        tries = 1
        while loss > 0 and rng.random() < loss:
            tries += 1
        sent += size * tries
        copies += tries
    return sent, copies
