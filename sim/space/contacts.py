"""`sparsat contacts`: the contact windows of a scenario's constellation over its stations,
as a CSV (and, on request, the constellation as TLEs and the stations as a CSV)."""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from sparsat.sim.scenario.schema import load
from sparsat.sim.space import orbits


def cmd_contacts(args: argparse.Namespace) -> int:
    scenario = load(args.scenario)
    if scenario.orbits is None:
        raise ValueError(f"{args.scenario} has no `orbits` section (constellation and stations)")
    o = scenario.orbits
    sats = orbits.constellation(scenario)
    sites = orbits.stations(scenario)
    if args.hours <= 0:
        raise ValueError("--hours must be > 0")
    t0 = time.perf_counter()
    windows = orbits.contact_windows(sats, sites, o.epoch, args.hours * 3600.0,
                                     args.step or o.step_s, o.tolerance_s)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["satellite", "station", "start_utc", "end_utc", "start_s", "end_s",
                    "max_elevation_deg"])
        for c in windows:
            w.writerow([c.satellite, c.station, orbits.utc(o.epoch, c.start_s),
                        orbits.utc(o.epoch, c.end_s), f"{c.start_s:.3f}", f"{c.end_s:.3f}",
                        f"{c.max_elevation_deg:.3f}"])
    if args.tle_out:
        orbits.write_tle(sats, args.tle_out)
    if args.stations_out:
        with open(args.stations_out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["station", "lat_deg", "lon_deg", "alt_m", "min_elevation_deg"])
            for st in sites:
                w.writerow([st.name, st.lat_deg, st.lon_deg, st.alt_m, st.min_elevation_deg])
    print(f"{len(windows)} contact windows of {len(sats)} satellites over {len(sites)} "
          f"stations in {args.hours:g} h (computed in {seconds:.1f} s) -> {out}")
    return 0
