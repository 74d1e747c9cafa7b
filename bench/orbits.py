"""Orbits benchmark: contact windows and a mission-control downlink of a big constellation.

Run from the repo root: .venv/bin/python bench/orbits.py [--satellites 1000] [--hours 24]
    [--step 30] [--samples 50] [--smoke]
A 1,000-satellite Walker-delta (40 planes x 25, 550 km, 53°) against five stations spread
over the globe:
1. the time to find and refine every contact window (edges to 1 s);
2. mission control's downlink phase for that constellation with payload sizes only (no ML,
   no node processes): each satellite holds --samples samples of a patch payload's wire size
   (488 B, r = 0.5 on 28x28) and sends them inside its windows, queueing for the stations'
   two antennas, at 1 Mbit/s with 1% frame loss.
Ends with one JSON line of its figures. --smoke: one plane of 25 satellites over 3 h, 20
samples each (seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime

import numpy as np

from sparsat.bench import parse_args
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.sim.mission.control import MissionControl
from sparsat.sim.scenario.schema import Scenario
from sparsat.sim.space.orbits import Station, contact_windows, walker_delta

SAMPLE_BYTES, ACK_BYTES = 488, 45  # patch sample at r = 0.5 and its ack, on the wire
SMOKE = {"satellites": 25, "hours": 3.0, "samples": 20}

STATIONS = [
    Station("kiruna", 67.86, 20.96, 400.0, 5.0),
    Station("wallops", 37.94, -75.46, 10.0, 10.0),
    Station("hartebeesthoek", -25.89, 27.69, 1500.0, 10.0),
    Station("singapore", 1.35, 103.82, 20.0, 10.0),
    Station("punta-arenas", -52.94, -70.85, 30.0, 5.0),
]


def phasing(planes: int) -> int:
    """Walker phasing f = 1 between adjacent planes; one plane has none (f < planes)."""
    return 1 if planes > 1 else 0


class SizeOnlySensor:
    """Stands in for a sensor host: a queue of equal-size samples, Transmit by budget."""

    def __init__(self, samples: int) -> None:
        self.left = samples

    def Transmit(self, request: pb.TransmitRequest, **_: object  # noqa: N802
                 ) -> pb.TransmitReport:
        n = min(self.left, request.max_bytes // (SAMPLE_BYTES + ACK_BYTES),
                request.max_samples or self.left)
        self.left -= n
        return pb.TransmitReport(  # one batch per sample: the old protocol's sizes
            satellite_id=request.satellite_id, batch_bytes=[SAMPLE_BYTES] * n, acked=n, sent=n,
            remaining=self.left, next_bytes=SAMPLE_BYTES + ACK_BYTES if self.left else 0,
            ack_bytes=[ACK_BYTES] * n)


def downlink_only(n_sats: int, hours: float, step: float, samples: int) -> dict[str, object]:
    stations = [{"name": st.name, "lat_deg": st.lat_deg, "lon_deg": st.lon_deg,
                 "alt_m": st.alt_m, "min_elevation_deg": st.min_elevation_deg, "antennas": 2}
                for st in STATIONS]
    scenario = Scenario.model_validate({
        "name": "scale", "sensors": {"count": n_sats},
        "mission": {"horizon_h": hours},
        "orbits": {"epoch": "2026-01-01T00:00:00Z", "step_s": step,
                   "walker": {"planes": n_sats // 25, "per_plane": 25,
                              "phasing": phasing(n_sats // 25),
                              "altitude_km": 550, "inclination_deg": 53},
                   "stations": stations},
        "links": {"downlink": {"rate_bps": 1e6, "latency_s": 0.01, "loss": 0.01}},
    })
    t0 = time.perf_counter()
    mc = MissionControl(scenario, "127.0.0.1:1", show_progress=False)
    sats = scenario.sensors.ids()
    stubs = {sat: SizeOnlySensor(samples) for sat in sats}
    host_of = {sat: pb.NodeInfo(node_id=sat) for sat in sats}
    from tqdm import tqdm

    from sparsat.sim.space.links import Link

    links = {sat: Link(mc.env, f"downlink:{sat}", 1e6, 0.01) for sat in sats}
    bar = tqdm(disable=True)
    mc.use_sensors(host_of, stubs)
    procs = mc._orbital_processes(links, bar)
    mc.env.run(until=mc.env.all_of(procs))
    seconds = time.perf_counter() - t0
    mc.gs_channel.close()
    t = mc.tally
    return {"mission_satellites": n_sats, "mission_samples": t.downlink_messages,
            "mission_wall_s": round(seconds, 2), "mission_time_h": round(mc.env.now / 3600, 2),
            "mission_bytes": t.total_bytes, "retransmitted_bytes": t.retransmitted_bytes,
            "queued_s": round(sum(v["queued_s"] for v in t.stations.values()), 1)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--satellites", type=int, default=1000, help="multiple of 25")
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--step", type=float, default=30.0, help="coarse grid, s")
    p.add_argument("--samples", type=int, default=500, help="samples per satellite (part 2)")
    args = parse_args(p, argv, SMOKE)
    planes = max(1, args.satellites // 25)
    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    t0 = time.perf_counter()
    sats = walker_delta(planes, 25, phasing(planes), 550.0, 53.0, epoch)
    windows = contact_windows(sats, STATIONS, epoch, args.hours * 3600.0, args.step, 1.0)
    seconds = time.perf_counter() - t0
    durations = np.array([c.duration_s for c in windows])
    figures: dict[str, object] = {
        "satellites": len(sats), "stations": len(STATIONS), "hours": args.hours,
        "step_s": args.step, "windows": len(windows), "contact_windows_s": round(seconds, 2),
        "median_window_s": round(float(np.median(durations)), 1) if len(windows) else 0.0,
        "per_station": {st.name: sum(c.station == st.name for c in windows) for st in STATIONS},
    }
    print(f"{len(sats)} satellites x {len(STATIONS)} stations x {args.hours:g} h: "
          f"{len(windows)} windows in {seconds:.1f} s (grid {args.step:g} s, edges to 1 s)")
    mission = downlink_only(len(sats), args.hours, args.step, args.samples)
    figures.update(mission)
    print(f"mission control, downlink only: {mission['mission_samples']:,} samples from "
          f"{len(sats)} satellites in {mission['mission_time_h']} h of mission time, "
          f"{mission['mission_wall_s']} s wall (windows included)")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
