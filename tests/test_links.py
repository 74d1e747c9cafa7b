"""SimPy links and pass windows: whole timelines asserted at once."""

from __future__ import annotations

from collections.abc import Generator

import pytest
import simpy

from sim.links import Link, PeriodicPasses

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
