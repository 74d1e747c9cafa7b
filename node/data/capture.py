"""Captures over time: when each satellite takes its scenes, and how many revisits that makes.

A satellite with a capture schedule starts with nothing on board and captures a scene every
3600 / rate_per_h seconds of its capture time: all the time, or only the first on_s of every
period_s (a duty cycle: the sensor is on over some of each orbit). Captures stop at the
mission's horizon. Capture k of a satellite whose shard holds n images is image k mod n of
the shard, revisit k // n: revisit 0 is the image's first capture (the sample id of today's
missions), revisit r > 0 a new sample (id r * N + index) with its own mask and cloud field.

The sensor host (sparsat.node.processes.sensor) makes the captures; the ground station sizes
its id space from max_captures, and mission control counts captures from the same functions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

WhenFull = Literal["drop_oldest", "drop_newest"]


@dataclass(frozen=True)
class CaptureSpec:
    rate_per_h: float  # scenes per hour of capture time, per satellite
    storage_bytes: int  # on board: what waits to be sent (payloads, raw scenes to encode)
    horizon_s: float  # no capture at or after the mission's horizon
    when_full: WhenFull = "drop_oldest"  # a capture that does not fit: drop older, or it
    duty_on_s: float | None = None  # captures only in the first on_s of every period_s
    duty_period_s: float | None = None

    def __post_init__(self) -> None:
        if not (self.rate_per_h > 0 and math.isfinite(self.rate_per_h)):
            raise ValueError(f"capture rate must be positive, got {self.rate_per_h}")
        if self.storage_bytes <= 0:
            raise ValueError(f"on-board storage must be positive, got {self.storage_bytes}")
        if not (self.horizon_s > 0 and math.isfinite(self.horizon_s)):
            raise ValueError(f"captures need a finite horizon, got {self.horizon_s}")
        if self.when_full not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"when_full must be drop_oldest or drop_newest, got "
                             f"{self.when_full!r}")
        if (self.duty_on_s is None) != (self.duty_period_s is None):
            raise ValueError("a duty cycle needs both duty_on_s and duty_period_s")
        if self.duty_on_s is not None and not 0 < self.duty_on_s <= self.duty_period_s:  # type: ignore[operator]
            raise ValueError(f"duty_on_s must be in (0, duty_period_s], got {self.duty_on_s}")

    @property
    def interval_s(self) -> float:
        return 3600.0 / self.rate_per_h

    def time_of(self, k: int) -> float:
        """Mission time of capture k (k >= 0)."""
        tau = k * self.interval_s  # capture time elapsed
        if self.duty_on_s is None:
            return tau
        assert self.duty_period_s is not None
        periods = math.floor(tau / self.duty_on_s)
        return periods * self.duty_period_s + (tau - periods * self.duty_on_s)

    def _count(self, t: float, strict: bool) -> int:
        """Captures with time_of(k) <= t (< t when strict)."""
        if t < 0 or (strict and t <= 0):
            return 0
        if self.duty_on_s is None:
            on = t
        else:
            assert self.duty_period_s is not None
            periods = math.floor(t / self.duty_period_s)
            on = periods * self.duty_on_s + min(t - periods * self.duty_period_s,
                                                self.duty_on_s)
        k = max(0, math.floor(on / self.interval_s))  # near the answer; exact below

        def made(j: int) -> bool:
            return self.time_of(j) < t if strict else self.time_of(j) <= t

        while made(k + 1):
            k += 1
        while k >= 0 and not made(k):
            k -= 1
        return k + 1

    def captured_by(self, t: float) -> int:
        """Captures one satellite has made by mission time t (the horizon caps them)."""
        return min(self._count(t, strict=False), self.max_captures)

    @property
    def max_captures(self) -> int:
        """Captures one satellite makes before the horizon."""
        return self._count(self.horizon_s, strict=True)

    def next_capture_s(self, made: int) -> float:
        """Mission time of the capture after `made` captures, -1 when none is left."""
        return self.time_of(made) if made < self.max_captures else -1.0

    def revisits(self, shard_size: int) -> int:
        """Visits of each image a shard of `shard_size` needs (the id space's copies)."""
        return max(1, -(-self.max_captures // max(1, shard_size)))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
