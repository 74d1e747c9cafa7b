"""Orbits benchmark: contact windows of a big Walker constellation over several stations.

Run from the repo root: .venv/bin/python bench/orbits.py [--satellites 1000] [--hours 24]
    [--step 30]
A 1,000-satellite Walker-delta (40 planes x 25, 550 km, 53°) against five stations spread
over the globe; prints the time to find and refine every window (edges to 1 s) and the
window statistics, and ends with one JSON line of its figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from sim.orbits import Station, contact_windows, walker_delta

STATIONS = [
    Station("kiruna", 67.86, 20.96, 400.0, 5.0),
    Station("wallops", 37.94, -75.46, 10.0, 10.0),
    Station("hartebeesthoek", -25.89, 27.69, 1500.0, 10.0),
    Station("singapore", 1.35, 103.82, 20.0, 10.0),
    Station("punta-arenas", -52.94, -70.85, 30.0, 5.0),
]


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--satellites", type=int, default=1000, help="multiple of 25")
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--step", type=float, default=30.0, help="coarse grid, s")
    args = p.parse_args(argv)
    planes = max(1, args.satellites // 25)
    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    t0 = time.perf_counter()
    sats = walker_delta(planes, 25, 1, 550.0, 53.0, epoch)
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
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
