"""SimPy links and pass windows: whole timelines asserted at once."""

from __future__ import annotations

from collections.abc import Generator

import pytest
import simpy

from sparsat.sim.space.links import Link, PeriodicPasses

RATE_BPS = 8_000  # 1,000 bytes per second: durations are easy to read


def test_transfers_queue_on_one_link() -> None:
    env = simpy.Environment()
    link = Link(env, "downlink:sat-0", RATE_BPS, latency_s=0.5)
    trace: list[tuple[str, float]] = []

    def sender(name: str, nbytes: int, at: float) -> Generator[simpy.Event, object, None]:
        yield env.timeout(at)
        trace.append((f"{name} asks", env.now))
        yield env.process(link.transfer(nbytes))
        trace.append((f"{name} done", env.now))

    env.process(sender("a", 2_000, 0.0))  # 0.5 + 2.0 s
    env.process(sender("b", 1_000, 1.0))  # waits for a, then 0.5 + 1.0 s
    env.run()

    assert trace == [("a asks", 0.0), ("b asks", 1.0), ("a done", 2.5), ("b done", 4.0)]
    assert link.bytes == 3_000 and link.busy_s == pytest.approx(4.0)


def test_capacity_leaves_room_for_latency() -> None:
    link = Link(simpy.Environment(), "l", RATE_BPS, latency_s=1.0)
    assert link.capacity(11.0) == 10_000
    assert link.capacity(0.5) == 0
    assert link.duration(link.capacity(11.0)) == pytest.approx(11.0)


@pytest.mark.parametrize("t, window", [
    (0.0, (100.0, 160.0)),     # before the first pass
    (100.0, (100.0, 160.0)),   # at its start
    (159.9, (100.0, 160.0)),   # inside
    (160.0, (1100.0, 1160.0)),  # at its end: the next one
    (5_000.0, (5100.0, 5160.0)),
])
def test_periodic_windows(t: float, window: tuple[float, float]) -> None:
    passes = PeriodicPasses(period_s=1_000.0, duration_s=60.0, offset_s=100.0)
    assert passes.window_at(t) == pytest.approx(window)


def test_link_budget_follows_range_and_caps_at_the_modem() -> None:
    import math

    from sparsat.sim.space.links import LinkBudget

    b = LinkBudget(frequency_hz=2.2e9, eirp_dbw=3.0, gt_dbk=2.0, bandwidth_hz=2e6,
                   modem_rate_bps=2e6, losses_db=3.0)
    # free-space path loss at 2.2 GHz over 1,000 km: 20 log10(1000) + 20 log10(2200) + 32.44
    assert b.fspl_db(1000.0) == pytest.approx(60 + 66.848 + 32.44, abs=0.01)
    assert b.snr_db(2000.0) == pytest.approx(b.snr_db(1000.0) - 6.02, abs=0.01)  # 1/r^2
    far = b.rate_bps(3000.0)
    snr = 10 ** (b.snr_db(3000.0) / 10)
    assert far == pytest.approx(2e6 * math.log2(1 + snr)) and far < 2e6
    assert b.rate_bps(500.0) == 2e6  # capped


def test_retransmission_charges_every_lost_frame_again() -> None:
    import random

    from sparsat.sim.space.links import retransmitted

    assert retransmitted(10_000, 0.0, 256, random.Random(0)) == 10_000
    sent = [retransmitted(25_600, 0.2, 256, random.Random(s)) for s in range(200)]
    assert min(sent) >= 25_600 and all(s % 256 == 0 for s in sent)
    assert sum(sent) / len(sent) == pytest.approx(25_600 / 0.8, rel=0.03)  # geometric tries
    assert retransmitted(300, 0.5, 256, random.Random(1)) in {300 + 256 * i + 44 * j
                                                              for i in range(20)
                                                              for j in range(20)}


class _Draws:
    """A random source that returns the given draws in turn."""

    def __init__(self, draws: list[float]) -> None:
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


def test_radio_framing_charges_each_frames_header_trailer_and_fec() -> None:
    from sparsat.sim.space.links import Framing

    ax25 = Framing(payload_bytes=252, header_bytes=21, trailer_bytes=3)
    # 600 gRPC bytes: frames of 252, 252 and 96, each with 24 bytes around it
    assert (ax25.frames(600), ax25.on_air(600)) == (3, 600 + 3 * 24)
    assert ax25.on_air(252) == 276 and ax25.on_air(253) == 253 + 48 and ax25.on_air(0) == 0
    assert ax25.send(600, 0.0, _Draws([])) == (600, 672)  # type: ignore[arg-type]
    # the first frame lost once: it is sent twice, with its overhead both times
    assert ax25.send(600, 0.2, _Draws([0.1, 0.9, 0.9, 0.9])) == (  # type: ignore[arg-type]
        852, 852 + 4 * 24)
    # CCSDS-style: 1,103 data bytes a frame, 12 around it, Reed-Solomon (255, 223)
    ccsds = Framing(payload_bytes=1103, header_bytes=10, trailer_bytes=2, fec_rate=223 / 255)
    assert ccsds.on_air(2000) == -(-(2000 + 2 * 12) * 255 // 223)  # 2,315
    assert ccsds.efficiency == pytest.approx(1103 / 1115 * 223 / 255)


def test_framing_in_a_scenario() -> None:
    from sparsat.sim.scenario.schema import LinkCfg

    link = LinkCfg(rate_bps=9600, framing={"kind": "ax25"})  # type: ignore[arg-type]
    assert link.framing is not None and link.framing.layout() == (252, 21, 3, 1.0)
    own = LinkCfg(rate_bps=9600, framing={"kind": "ccsds", "fec_rate": 0.5})  # type: ignore[arg-type]
    assert own.framing is not None and own.framing.layout() == (1103, 10, 2, 0.5)
    with pytest.raises(ValueError, match="frame_bytes has no effect with framing"):
        LinkCfg(rate_bps=9600, frame_bytes=128, framing={"kind": "ax25"})  # type: ignore[arg-type]


def test_dvb_s2_modcod_follows_the_geometry() -> None:
    """scenarios/sband.yaml's budget (2.2 GHz, EIRP 3 dBW, G/T 2 dB/K, 2 MHz, 3 dB losses),
    550 km up, a 1 dB margin and a 0.2 roll-off. Overhead (550 km): FSPL = 20 log 550 +
    20 log 2200 + 32.44 = 154.09 dB, C/N = 3 + 2 - 154.09 - 3 + 228.6 - 63.01 = 13.49 dB,
    Es/N0 = 13.49 + 10 log 1.2 = 14.29 dB: 32APSK 3/4 (12.73 + 1 <= 14.29; 32APSK 4/5 needs
    14.64), 3.7033 bit/symbol x 2 MHz / 1.2. At 10 degrees elevation (1,815 km): FSPL 164.46,
    C/N 3.12, Es/N0 3.92 dB: QPSK 3/5 (2.23 + 1; QPSK 2/3 needs 4.10)."""
    from sparsat.sim.space.links import AdaptiveModcod, LinkBudget

    acm = AdaptiveModcod(margin_db=1.0, rolloff=0.2)
    b = LinkBudget(2.2e9, 3.0, 2.0, 2e6, modem_rate_bps=1e9, losses_db=3.0, modcod=acm)
    assert b.snr_db(550.0) == pytest.approx(13.49, abs=0.01)
    assert acm.choose(b.snr_db(550.0)) == ("32APSK 3/4", 3.703295)
    assert b.rate_bps(550.0) == pytest.approx(2e6 / 1.2 * 3.703295)
    assert b.snr_db(1815.1) == pytest.approx(3.12, abs=0.01)
    assert acm.choose(b.snr_db(1815.1)) == ("QPSK 3/5", 1.188304)
    assert b.rate_bps(1815.1) == pytest.approx(2e6 / 1.2 * 1.188304)
    # below QPSK 1/4's threshold nothing closes; the modem's rate caps the rest
    assert acm.choose(-5.0) is None and b.rate_bps(10_000.0) == 0.0
    # what results.json's modcods books each transfer on
    assert (b.mode(550.0), b.mode(1815.1), b.mode(10_000.0)) == ("32APSK 3/4", "QPSK 3/5",
                                                                 "none")
    capped = LinkBudget(2.2e9, 3.0, 2.0, 2e6, modem_rate_bps=2e6, losses_db=3.0, modcod=acm)
    assert capped.rate_bps(550.0) == 2e6
    # without MODCODs: Shannon, as before
    shannon = LinkBudget(2.2e9, 3.0, 2.0, 2e6, modem_rate_bps=1e9, losses_db=3.0)
    assert shannon.rate_bps(550.0) > b.rate_bps(550.0)
    assert shannon.mode(550.0) is None
