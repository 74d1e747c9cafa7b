"""SimPy link and pass models."""

from __future__ import annotations

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

    def transfer(self, nbytes: int) -> Generator[simpy.Event, object, None]:
        with self.channel.request() as req:
            yield req
            seconds = self.duration(nbytes)
            yield self.env.timeout(seconds)
            self.bytes += nbytes
            self.busy_s += seconds


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
