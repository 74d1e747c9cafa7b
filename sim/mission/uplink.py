"""The uplink of projected CLS payloads: the basis (with its PQ codebooks) and the zstd
dictionary the ground station fitted, charged on links.uplink inside a satellite's window,
before that contact's downlink, and handed to the satellite's host with its next Transmit.

A PCA basis is fitted before the mission starts; a supervised one once the ground station
holds `fit_samples` labelled samples, which satellites without a basis send as plain tokens
(each at most its share); a satellite that has sent its share waits for the fit. Every wait
and every uplink is counted.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import simpy

from sparsat.node.wire.basis import uplink_sizes
from sparsat.sim.mission.ground_client import GroundStationClient
from sparsat.sim.mission.tally import Tally
from sparsat.sim.scenario.configs import capturing_satellites
from sparsat.sim.scenario.schema import Scenario

log = logging.getLogger("sparsat.mission")


class Uplink:
    def __init__(self, env: simpy.Environment, scenario: Scenario, tally: Tally,
                 gs: GroundStationClient) -> None:
        self.env, self.s, self.tally, self.gs = env, scenario, tally, gs
        self.projection = scenario.sensors.payload.projection
        down, up = scenario.links.downlink, scenario.links.uplink
        self.rate_bps = up.rate_bps if up is not None else down.rate_bps
        self.latency_s = up.latency_s if up is not None else down.latency_s
        self.basis: Any = None  # pb.Basis once fitted
        self.dictionary = b""
        # what uplinking them puts on the link, by kind (bases, codebooks, dictionaries)
        self.sizes: dict[str, int] = {}
        self.held: dict[str, int] = {}  # satellite -> the basis version it was uplinked
        self.ready = env.event()  # the basis is fitted
        share = 0
        if self.projection is not None and self.projection.method == "supervised":
            share = math.ceil(self.projection.fit_samples / capturing_satellites(scenario))
        self.share: dict[str, int] = dict.fromkeys(scenario.sensors.ids(), share)
        self.plain_stored = 0  # plain tokens stored for the supervised fit so far
        self._waiting: set[str] = set()

    def needs(self, sat_id: str) -> bool:
        """The satellite does not hold the ground's current basis (or there is none yet)."""
        return self.basis is None or self.held.get(sat_id) != self.basis.version

    def fetch(self) -> bool:
        """Ask the ground station for the basis (it fits it on the first call that can);
        True once there is one."""
        if self.basis is not None:
            return True
        t0 = time.monotonic()
        reply = self.gs.uplink()
        self.tally.stage_wall_s["fit"] = self.tally.stage_wall_s.get("fit", 0.0) + (
            time.monotonic() - t0)
        if reply is None:
            return False
        self.basis, self.dictionary = reply.basis, bytes(reply.dictionary)
        self.sizes = uplink_sizes(self.basis, self.dictionary)
        self.tally.basis = {"version": int(reply.basis.version),
                            "method": reply.basis.method, "dim": int(reply.basis.dim),
                            "quantizer": reply.basis.quantizer, "scale": reply.basis.scale,
                            "fit_tokens": int(reply.fit_tokens),
                            "fit_wall_s": round(float(reply.fit_s), 3),
                            "fitted_at_s": round(self.env.now, 3)}
        log.info("basis %d (%s) fitted on %d tokens at mission time %.0f s",
                 reply.basis.version, reply.basis.method, reply.fit_tokens, self.env.now)
        if not self.ready.triggered:
            self.ready.succeed()
        return True

    def seconds(self, propagation_s: float) -> float:
        """Air time of the uplink: the link's latency (and the slant range's), then its bytes."""
        return propagation_s + self.latency_s + 8 * sum(self.sizes.values()) / self.rate_bps

    def charge(self, sat_id: str, seconds: float, station: str | None) -> tuple[Any, bytes]:
        """The satellite was uplinked the current basis in `seconds` (over `station`'s
        antenna, with orbits): counted; what its host is handed."""
        assert self.basis is not None
        t, total = self.tally, sum(self.sizes.values())
        t.book_uplink(sat_id, self.sizes)
        t.uplinks += 1
        t.uplink_s += seconds
        if station is not None:  # on the station's antenna too (half duplex)
            t.stations[station]["bytes"] += total
            t.stations[station]["busy_s"] += seconds
        self.held[sat_id] = int(self.basis.version)
        return self.basis, self.dictionary

    def spent(self, sat_id: str, stored: int) -> None:
        """`stored` plain tokens of the satellite's share were stored."""
        self.share[sat_id] -= stored
        self.plain_stored += stored

    def more_share(self, sat_id: str, flying: set[str]) -> bool:
        """A satellite has spent its share and the fit still lacks samples: when no other
        satellite still flying has share left (the others finished or hold fewer images than
        their share), it takes what the fit lacks. False when it must wait for the others."""
        assert self.projection is not None
        if any(self.share.get(s, 0) > 0 for s in flying - {sat_id}):
            return False
        lacking = self.projection.fit_samples - self.plain_stored
        if lacking <= 0:
            return False  # enough stored: the fit waits on the ground station, not on us
        self.share[sat_id] = lacking
        return True

    def lost(self, sat_id: str, version: int) -> None:
        """The satellite's host reports another basis than it was uplinked (it restarted):
        it is uplinked again in its next window."""
        if self.held.get(sat_id, 0) != version:
            log.warning("%s holds basis %d, not the %d it was uplinked: uplinking again",
                        sat_id, version, self.held.get(sat_id, 0))
            self.held.pop(sat_id, None)

    def waited(self, sat_id: str, reason: str) -> None:
        """The satellite let a window (or part of one) go by for want of its basis."""
        w = self.tally.basis_waits
        w[reason] = w.get(reason, 0) + 1
        if sat_id not in self._waiting:
            self._waiting.add(sat_id)
            log.info("%s waits for its basis (%s)", sat_id, reason)
