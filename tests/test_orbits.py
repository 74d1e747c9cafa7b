"""Orbits and contact windows against known geometry, skyfield, and the CLI."""

from __future__ import annotations

import csv
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sparsat.sim.cli import main
from sparsat.sim.scenario.schema import Scenario, load
from sparsat.sim.space import orbits
from sparsat.sim.space.orbits import Contact, OrbitError, Station, contact_windows, walker_delta

EPOCH = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent


def _subpoint_lon_deg(sat: orbits.Satellite, t: float) -> tuple[float, float]:
    x, y, z = orbits.ecef_positions_km([sat], EPOCH, np.array([t]))[0, 0]
    return math.degrees(math.atan2(z, math.hypot(x, y))), math.degrees(math.atan2(y, x))


def test_a_satellite_over_a_stations_zenith_is_at_90_degrees() -> None:
    sat = walker_delta(1, 1, 0, 550.0, 0.0, EPOCH)[0]  # equatorial: the subpoint is on lat 0
    lat, lon = _subpoint_lon_deg(sat, 600.0)
    assert abs(lat) < 0.05
    st = Station("under", 0.0, lon, 0.0, 10.0)
    pos = orbits.ecef_positions_km([sat], EPOCH, np.array([600.0]))[0]
    assert orbits.elevation_deg(pos, st)[0] > 89.9
    assert orbits.slant_range_km(pos, st)[0] == pytest.approx(550.0, abs=15.0)
    windows = contact_windows([sat], [st], EPOCH, 3600.0)
    assert any(c.start_s < 600.0 < c.end_s and c.max_elevation_deg > 89.5 for c in windows)


def test_a_polar_orbit_passes_over_a_polar_station_every_revolution() -> None:
    sat = walker_delta(1, 1, 0, 550.0, 90.0, EPOCH)[0]
    st = Station("pole", 89.9, 0.0, 0.0, 10.0)
    windows = contact_windows([sat], [st], EPOCH, 86400.0)
    period_s = 2 * math.pi / orbits.mean_motion_rad_min(550.0) * 60
    assert len(windows) in (math.floor(86400 / period_s), math.ceil(86400 / period_s))
    assert all(c.max_elevation_deg > 70 for c in windows)
    gaps = np.diff([c.start_s for c in windows])
    assert np.allclose(gaps, period_s, atol=30)


def test_an_equatorial_orbit_is_never_seen_from_high_latitude() -> None:
    sat = walker_delta(1, 1, 0, 550.0, 0.0, EPOCH)[0]
    assert contact_windows([sat], [Station("north", 60.0, 10.0)], EPOCH, 86400.0) == []
    assert contact_windows([sat], [Station("equator", 0.0, 10.0)], EPOCH, 86400.0)


def test_window_edges_are_refined_to_one_second() -> None:
    sats = walker_delta(2, 3, 1, 600.0, 60.0, EPOCH)
    st = Station("mid", 45.0, 7.0, 300.0, 15.0)
    windows = contact_windows(sats, [st], EPOCH, 12 * 3600.0, step_s=60.0, tol_s=1.0)
    assert windows
    by_name = {s.name: s for s in sats}
    for c in windows:
        sat = by_name[c.satellite]
        t = np.array([c.start_s - 1.0, c.start_s, c.end_s, c.end_s + 1.0])
        el = orbits.elevation_deg(orbits.ecef_positions_km([sat], EPOCH, t)[0], st)
        if c.start_s > 0:
            assert el[0] < 15.0 <= el[1]
        if c.end_s < 12 * 3600.0:
            assert el[2] >= 15.0 > el[3]
        assert c.max_elevation_deg >= max(el[1], el[2])


def test_elevations_and_windows_match_skyfield(tmp_path: Path) -> None:
    skyfield = pytest.importorskip("skyfield.api")
    sats = walker_delta(3, 2, 1, 550.0, 53.0, EPOCH)
    orbits.write_tle(sats, tmp_path / "c.tle")
    loaded = orbits.load_tle(tmp_path / "c.tle")
    assert [s.name for s in loaded] == [s.name for s in sats]
    lines = (tmp_path / "c.tle").read_text().splitlines()
    ts = skyfield.load.timescale(builtin=True)
    st = Station("wallops", 37.94, -75.46, 10.0, 10.0)
    top = skyfield.wgs84.latlon(st.lat_deg, st.lon_deg, st.alt_m)
    for k in range(3):
        sf = skyfield.EarthSatellite(lines[3 * k + 1], lines[3 * k + 2], lines[3 * k], ts)
        seconds = np.arange(0.0, 6 * 3600.0, 777.0)
        t = ts.utc(2026, 3, 20, 12, 0, seconds)
        alt = (sf - top).at(t).altaz()[0].degrees
        ours = orbits.elevation_deg(orbits.ecef_positions_km([loaded[k]], EPOCH, seconds)[0], st)
        assert np.max(np.abs(alt - ours)) < 0.02  # skyfield adds polar motion, nutation
        t0, t1 = ts.utc(2026, 3, 20, 12), ts.utc(2026, 3, 21, 12)
        times, events = sf.find_events(top, t0, t1, altitude_degrees=st.min_elevation_deg)
        theirs = [(tt - t0) * 86400.0 for tt, ev in zip(times, events, strict=True) if ev != 1]
        mine = contact_windows([loaded[k]], [st], EPOCH, 86400.0)
        edges = [e for c in mine for e in (c.start_s, c.end_s) if 0 < e < 86400.0]
        assert len(edges) == len(theirs)
        assert np.max(np.abs(np.array(edges) - np.array(theirs))) < 3.0


def _skyfield_windows(api: Any, lines: list[str], st: Station, epoch: datetime,
                      duration_s: float) -> list[tuple[float, float]]:
    """skyfield's windows of one three-line set, cut at 0 and `duration_s` like ours."""
    ts = api.load.timescale(builtin=True)
    sf = api.EarthSatellite(lines[1], lines[2], lines[0], ts)
    t0, t1 = ts.from_datetime(epoch), ts.from_datetime(epoch + timedelta(seconds=duration_s))
    times, events = sf.find_events(api.wgs84.latlon(st.lat_deg, st.lon_deg, st.alt_m), t0, t1,
                                   altitude_degrees=st.min_elevation_deg)
    rises = [(t - t0) * 86400.0 for t, ev in zip(times, events, strict=True) if ev == 0]
    sets = [(t - t0) * 86400.0 for t, ev in zip(times, events, strict=True) if ev == 2]
    if sets and (not rises or sets[0] < rises[0]):
        rises.insert(0, 0.0)
    if len(rises) > len(sets):
        sets.append(duration_s)
    return list(zip(rises, sets, strict=True))


def _by_pair(windows: list[Contact]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    pairs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for c in windows:
        pairs.setdefault((c.satellite, c.station), []).append((c.start_s, c.end_s))
    return pairs


def test_pleo_grazing_passes_between_grid_points_match_skyfield(tmp_path: Path) -> None:
    """The reported case: over 24 h, pleo.yaml's sat-56 clears wallops's 10° for ~5.3 s
    between two points of the 30 s grid. Every window skyfield finds for the exported TLEs
    (120 satellites x 4 stations) is found, edges within 1.5 s (tolerance 1 s, the in-view
    side, plus the two models' ~0.02°)."""
    api = pytest.importorskip("skyfield.api")
    scenario = load(ROOT / "scenarios" / "pleo.yaml")
    assert scenario.orbits is not None
    o, day = scenario.orbits, 86400.0
    sats, sites = orbits.constellation(scenario), orbits.stations(scenario)
    orbits.write_tle(sats, tmp_path / "c.tle")  # as `sparsat contacts --tle-out` does
    lines = (tmp_path / "c.tle").read_text().splitlines()

    windows = contact_windows(sats, sites, o.epoch, day, o.step_s, o.tolerance_s)

    theirs = {(lines[3 * k], st.name): _skyfield_windows(api, lines[3 * k : 3 * k + 3], st,
                                                         o.epoch, day)
              for k in range(len(sats)) for st in sites}
    ours = _by_pair(windows)
    assert set(ours) <= {k for k, w in theirs.items() if w}
    for key, expected in theirs.items():
        found = np.array(ours.get(key, [])).reshape(-1, 2)
        assert len(found) == len(expected), key
        if len(found):
            assert np.max(np.abs(found - np.array(expected))) < 1.5, key
            assert np.all(found[1:, 0] > found[:-1, 1]), key  # apart, in order
    assert [c.start_s for c in windows] == sorted(c.start_s for c in windows)
    grazing = [(a, b) for a, b in theirs[("sat-56", "wallops")] if b - a < o.step_s]
    assert len(grazing) == 1 and 5.0 < grazing[0][1] - grazing[0][0] < 5.6
    mine = [c for c in windows if (c.satellite, c.station) == ("sat-56", "wallops")
            and abs(c.start_s - grazing[0][0]) < 1.0 and abs(c.end_s - grazing[0][1]) < 1.0]
    assert len(mine) == 1 and 10.0 <= mine[0].max_elevation_deg < 10.05


def test_a_coarse_grid_finds_every_window_a_fine_grid_finds() -> None:
    """A 120 s grid misses no window that a 1 s grid finds (13 are shorter than 120 s; the
    grid alone missed 6 of them), edges within the tolerance, peaks within 0.02° (the peak
    search stops at 0.5 s, ~0.013° near the zenith)."""
    sats = walker_delta(4, 5, 1, 550.0, 53.0, EPOCH)
    sites = [Station("wallops", 37.94, -75.46, 10.0, 10.0),
             Station("kiruna", 67.86, 20.96, 400.0, 5.0),
             Station("punta-arenas", -52.94, -70.85, 30.0, 5.0)]

    fine = contact_windows(sats, sites, EPOCH, 86400.0, step_s=1.0, tol_s=1.0)
    coarse = contact_windows(sats, sites, EPOCH, 86400.0, step_s=120.0, tol_s=1.0)

    assert sum(c.duration_s < 120.0 for c in fine) >= 10
    assert len(coarse) == len(fine)
    for c in fine:
        match = [m for m in coarse if (m.satellite, m.station) == (c.satellite, c.station)
                 and abs(m.start_s - c.start_s) <= 1.0 and abs(m.end_s - c.end_s) <= 1.0]
        assert len(match) == 1, c
        assert match[0].max_elevation_deg == pytest.approx(c.max_elevation_deg, abs=0.02)


def test_sampled_maxima_flag_one_sample_per_turn() -> None:
    """Strictly above the sample before, at least the one after: a plateau is flagged once,
    at its first sample, whose neighbours bracket the turn; an end counts against its one
    neighbour."""
    el = np.array([[1.0, 2.0, 2.0, 1.0, 0.0, 0.0, 3.0, 3.0],
                   [3.0, 3.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
                   [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])

    peaks = orbits._local_maxima(el)

    assert [np.nonzero(row)[0].tolist() for row in peaks] == [[1, 6], [0, 5], [7]]


def test_walker_delta_spacing() -> None:
    sats = walker_delta(4, 5, 2, 700.0, 70.0, EPOCH)
    assert [s.name for s in sats] == [f"sat-{i}" for i in range(20)]
    raan = sorted({round(math.degrees(s.satrec.nodeo), 6) for s in sats})
    assert raan == [0.0, 90.0, 180.0, 270.0]
    plane1 = [math.degrees(s.satrec.mo) for s in sats[5:10]]
    assert plane1[0] == pytest.approx(2 * 360 / 20)  # f * 360 / t
    assert np.allclose(np.diff(plane1) % 360, 72.0)
    with pytest.raises(OrbitError, match="phasing"):
        walker_delta(2, 2, 2, 500.0, 50.0, EPOCH)


def test_bad_tle_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(OrbitError, match="not found"):
        orbits.load_tle(tmp_path / "missing.tle")
    (tmp_path / "bad.tle").write_text("2 orphan line\n")
    with pytest.raises(OrbitError, match="line 1"):
        orbits.load_tle(tmp_path / "bad.tle")


SCENARIO = {
    "name": "orbits",
    "sensors": {"count": 6, "prefix": "cube-"},
    "orbits": {"epoch": "2026-03-20T12:00:00Z",
               "walker": {"planes": 3, "per_plane": 2, "phasing": 1, "altitude_km": 550,
                          "inclination_deg": 97.6},
               "stations": [{"name": "svalbard", "lat_deg": 78.23, "lon_deg": 15.39,
                             "alt_m": 500, "min_elevation_deg": 5},
                            {"name": "wallops", "lat_deg": 37.94, "lon_deg": -75.46}]},
}


def test_sparsat_contacts_writes_windows_tles_and_stations(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / "w.csv"
    code = main(["contacts", str(path), "--hours", "6", "--out", str(out), "--tle-out",
                 str(tmp_path / "c.tle"), "--stations-out", str(tmp_path / "st.csv")])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert rows and set(rows[0]) == {"satellite", "station", "start_utc", "end_utc", "start_s",
                                     "end_s", "max_elevation_deg"}
    assert {r["satellite"] for r in rows} <= {f"cube-{i}" for i in range(6)}
    assert {r["station"] for r in rows} == {"svalbard", "wallops"}  # polar orbits: both
    first = rows[0]
    start = datetime.fromisoformat(first["start_utc"].replace("Z", "+00:00"))
    assert (start - EPOCH).total_seconds() == pytest.approx(float(first["start_s"]), abs=1e-3)
    assert [s.name for s in orbits.load_tle(tmp_path / "c.tle")] == [f"cube-{i}" for i in
                                                                     range(6)]
    assert (tmp_path / "st.csv").read_text().splitlines()[0] == \
        "station,lat_deg,lon_deg,alt_m,min_elevation_deg"


def test_scenario_orbits_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="sensors.count"):
        Scenario.model_validate({**SCENARIO, "sensors": {"count": 5}})
    with pytest.raises(ValueError, match="exactly one of walker or tle"):
        Scenario.model_validate({**SCENARIO, "orbits": {**SCENARIO["orbits"], "tle": "x.tle"}})
    path = tmp_path / "none.yaml"
    path.write_text(yaml.safe_dump({"name": "no-orbits"}))
    assert main(["contacts", str(path), "--out", str(tmp_path / "w.csv")]) == 2
    assert "no `orbits` section" in capsys.readouterr().err
