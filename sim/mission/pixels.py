"""Coded patch payloads in the mission's books: a shared JPEG / JPEG 2000 header's uplink.

The header reaches a satellite's host in its sensor setup at registration
(SensorSetup.codec_header); it is counted as uplinked once to every satellite (in
bytes.uplink_breakdown `codec_header` and each satellite's `uplink:SAT` link) before the
mission, like the cloud detector's parameters. Its air time is not put on the mission clock
(a few hundred bytes once, against a day's downlink).
"""

from __future__ import annotations

from sparsat.node.data.datasets import load_dataset
from sparsat.node.wire.images import shared_head
from sparsat.sim.mission.tally import Tally
from sparsat.sim.scenario.configs import sensor_config
from sparsat.sim.scenario.schema import Scenario


def header_bytes(s: Scenario) -> int:
    """The shared header's bytes a satellite is sent (0: none travels)."""
    cfg = sensor_config(s)
    if not cfg.codec.header_in_setup:
        return 0  # no dataset loaded
    shape = load_dataset(cfg.dataset, "test").image_shape
    return len(shared_head(cfg.codec, shape)) if shape is not None else 0


def charge(s: Scenario, tally: Tally) -> None:
    """Count the shared header's uplink to every satellite (nothing when none travels)."""
    n = header_bytes(s)
    if not n:
        return
    for sat in s.sensors.ids():
        tally.book_uplink(sat, {"codec_header": n})
