"""Orbits and contact windows: Walker-delta constellations or TLE files, propagated with SGP4.

Satellites are `sgp4.api.Satrec` objects, built with `sgp4init` (nothing is downloaded) or
read from two-line element sets. Positions come from `SatrecArray` (all satellites x all
times in one C call) in the TEME frame and are rotated to Earth-fixed coordinates by the
Greenwich mean sidereal time (IAU 1982, polar motion ignored). A station's elevation angle is
measured in its topocentric frame on the WGS-84 ellipsoid. Contact windows are found on a
coarse grid, their edges refined by bisection to `tol_s`, their peak elevation by a golden
section search; a pass that clears the minimum only between grid points is found by that same
search from the sampled elevation's local maxima.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sgp4.api import WGS72, Satrec, SatrecArray, jday
from sgp4.exporter import export_tle

if TYPE_CHECKING:
    from sparsat.sim.scenario.schema import Scenario

MU_KM3_S2 = 398600.4418  # WGS-84 gravitational parameter
WGS84_A_KM = 6378.137
WGS84_F = 1 / 298.257223563
WGS84_E2 = WGS84_F * (2 - WGS84_F)
SGP4_EPOCH_JD = 2433281.5  # sgp4init counts epoch days from 1949 December 31 00:00 UT
GOLDEN = (math.sqrt(5) - 1) / 2
EARTH_RATE_RAD_S = 7.2921150e-5  # sidereal rotation, IERS


class OrbitError(ValueError):
    """Bad orbital elements, a TLE that does not parse, or a propagation failure."""


@dataclass(frozen=True)
class Station:
    name: str
    lat_deg: float
    lon_deg: float
    alt_m: float = 0.0
    min_elevation_deg: float = 10.0


@dataclass(frozen=True)
class Satellite:
    name: str
    satrec: Satrec


@dataclass(frozen=True)
class Contact:
    satellite: str
    station: str
    start_s: float  # seconds from the epoch
    end_s: float
    max_elevation_deg: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


# ---- constellations ---------------------------------------------------------------------------


def mean_motion_rad_min(altitude_km: float) -> float:
    """Two-body mean motion of a circular orbit at `altitude_km` above the equator."""
    a = WGS84_A_KM + altitude_km
    return math.sqrt(MU_KM3_S2 / a**3) * 60.0


def walker_delta(planes: int, per_plane: int, phasing: int, altitude_km: float,
                 inclination_deg: float, epoch: datetime, prefix: str = "sat-",
                 first_satnum: int = 1) -> list[Satellite]:
    """A Walker-delta constellation i:t/p/f, t = planes * per_plane: planes spread over 360°
    of right ascension, satellites evenly spaced in each plane, adjacent planes shifted by
    f * 360° / t in mean anomaly. Circular orbits; names `prefix` + index, plane by plane."""
    t = planes * per_plane
    if planes < 1 or per_plane < 1:
        raise OrbitError(f"a Walker constellation needs planes and per_plane >= 1, got "
                         f"{planes} and {per_plane}")
    if not 0 <= phasing < max(planes, 1):
        raise OrbitError(f"phasing must be in [0, planes - 1] = [0, {planes - 1}], got {phasing}")
    if altitude_km < 100:
        raise OrbitError(f"altitude {altitude_km} km is inside the atmosphere")
    if not 0 <= inclination_deg <= 180:
        raise OrbitError(f"inclination must be in [0, 180] degrees, got {inclination_deg}")
    n = mean_motion_rad_min(altitude_km)
    epoch_days = _julian(epoch) - SGP4_EPOCH_JD
    sats: list[Satellite] = []
    for p in range(planes):
        raan = 2 * math.pi * p / planes
        for s in range(per_plane):
            mean_anomaly = 2 * math.pi * (s / per_plane + phasing * p / t)
            rec = Satrec()
            rec.sgp4init(WGS72, "i", first_satnum + len(sats), epoch_days, 0.0, 0.0, 0.0,
                         0.0, 0.0, math.radians(inclination_deg),
                         mean_anomaly % (2 * math.pi), n, raan)
            sats.append(Satellite(f"{prefix}{len(sats)}", rec))
    return sats


def load_tle(path: str | Path, prefix: str = "sat-") -> list[Satellite]:
    """Two- or three-line element sets; unnamed sets are called `prefix` + index."""
    path = Path(path)
    if not path.exists():
        raise OrbitError(f"TLE file not found: {path}")
    lines = [ln.rstrip() for ln in path.read_text().splitlines() if ln.strip()]
    sats: list[Satellite] = []
    name: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("1 ") and i + 1 < len(lines) and lines[i + 1].startswith("2 "):
            try:
                rec = Satrec.twoline2rv(line, lines[i + 1])
            except ValueError as e:
                raise OrbitError(f"{path}: line {i + 1}: {e}") from e
            sats.append(Satellite(name or f"{prefix}{len(sats)}", rec))
            name, i = None, i + 2
        elif not line.startswith(("1 ", "2 ")):
            name, i = line.removeprefix("0 ").strip(), i + 1
        else:
            raise OrbitError(f"{path}: line {i + 1} is not part of a two-line element set")
    if not sats:
        raise OrbitError(f"{path}: no two-line element sets found")
    return sats


def write_tle(sats: Iterable[Satellite], path: str | Path) -> None:
    """Three-line sets: the name, then the standard two lines."""
    out = []
    for sat in sats:
        line1, line2 = export_tle(sat.satrec)
        out += [sat.name, line1, line2]
    Path(path).write_text("\n".join(out) + "\n")


# ---- geometry ---------------------------------------------------------------------------------


def _julian(t: datetime) -> float:
    t = t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    jd, fr = jday(t.year, t.month, t.day, t.hour, t.minute, t.second + t.microsecond * 1e-6)
    return jd + fr


def gmst_rad(jd_ut1_days_since_j2000: np.ndarray) -> np.ndarray:
    """Greenwich mean sidereal time (IAU 1982), from days since J2000.0 (2451545.0)."""
    t = jd_ut1_days_since_j2000 / 36525.0
    seconds = (-6.2e-6 * t**3 + 0.093104 * t**2 + (876600.0 * 3600 + 8640184.812866) * t
               + 67310.54841)
    return np.mod(np.radians(seconds / 240.0), 2 * np.pi)


def station_ecef_km(st: Station) -> np.ndarray:
    lat, lon = math.radians(st.lat_deg), math.radians(st.lon_deg)
    n = WGS84_A_KM / math.sqrt(1 - WGS84_E2 * math.sin(lat) ** 2)
    h = st.alt_m / 1000.0
    return np.array([(n + h) * math.cos(lat) * math.cos(lon),
                     (n + h) * math.cos(lat) * math.sin(lon),
                     (n * (1 - WGS84_E2) + h) * math.sin(lat)])


def _up(st: Station) -> np.ndarray:
    lat, lon = math.radians(st.lat_deg), math.radians(st.lon_deg)
    return np.array([math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon),
                     math.sin(lat)])


def _teme_to_ecef(r: np.ndarray, epoch_jd: float, times_s: np.ndarray) -> np.ndarray:
    theta = gmst_rad((epoch_jd - 2451545.0) + times_s / 86400.0)
    c, s = np.cos(theta), np.sin(theta)
    x, y = r[..., 0], r[..., 1]
    return np.stack([c * x + s * y, -s * x + c * y, r[..., 2]], axis=-1)


def _jd_fr(epoch_jd: float, times_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SGP4's (whole Julian day, day fraction) for `times_s` after the epoch: split so the
    fraction keeps sub-millisecond precision."""
    jd0 = math.floor(epoch_jd - 0.5) + 0.5
    fr = (epoch_jd - jd0) + times_s / 86400.0
    return np.full_like(fr, jd0), fr


def ecef_positions_km(sats: Sequence[Satellite], epoch: datetime,
                      times_s: np.ndarray) -> np.ndarray:
    """(satellites, times, 3) Earth-fixed positions at `times_s` seconds from `epoch`."""
    epoch_jd, times_s = _julian(epoch), np.asarray(times_s, dtype=np.float64)
    err, r, _ = SatrecArray([s.satrec for s in sats]).sgp4(*_jd_fr(epoch_jd, times_s))
    if np.any(err):
        bad = sorted({sats[int(i)].name for i in np.nonzero(err)[0]})
        raise OrbitError(f"SGP4 failed for {bad[:5]} (decayed or invalid elements)")
    return _teme_to_ecef(r, epoch_jd, times_s)


def _elevation(rho: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Degrees above the horizon of line-of-sight vectors `rho` from sites whose local
    vertical is `up` (both (..., 3), broadcast)."""
    dist = np.linalg.norm(rho, axis=-1)
    return np.degrees(np.arcsin(np.clip((rho * up).sum(-1) / dist, -1.0, 1.0)))


def elevation_deg(pos_ecef_km: np.ndarray, st: Station) -> np.ndarray:
    """Elevation of positions (..., 3) above the station's horizon, degrees."""
    return _elevation(pos_ecef_km - station_ecef_km(st), _up(st))


def slant_range_km(pos_ecef_km: np.ndarray, st: Station) -> np.ndarray:
    return np.asarray(np.linalg.norm(pos_ecef_km - station_ecef_km(st), axis=-1))


# ---- contact windows --------------------------------------------------------------------------


class _Sites:
    """Stations as arrays, so one propagation serves crossings at several stations."""

    def __init__(self, stations: Sequence[Station]) -> None:
        self.ecef = np.stack([station_ecef_km(st) for st in stations])  # (N, 3)
        self.up = np.stack([_up(st) for st in stations])
        self.min_el = np.array([st.min_elevation_deg for st in stations])

    def elevation(self, pos: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return _elevation(pos - self.ecef[idx], self.up[idx])


def _positions(recs: Sequence[Satellite], owner: np.ndarray, epoch_jd: float,
               times_s: np.ndarray) -> np.ndarray:
    """(P, 3) Earth-fixed positions of satellite `recs[owner[k]]` at `times_s[k]`: one SGP4
    call per satellite (a C loop over its times), the frame rotation for all at once."""
    jd, fr = _jd_fr(epoch_jd, times_s)
    r = np.empty((len(times_s), 3))
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(len(recs) + 1))
    for i in np.flatnonzero(np.diff(bounds)).tolist():
        k = order[bounds[i] : bounds[i + 1]]
        err, r[k], _ = recs[i].satrec.sgp4_array(jd[k], fr[k])
        if np.any(err):
            raise OrbitError(f"SGP4 failed for {recs[i].name} (decayed or invalid elements)")
    return _teme_to_ecef(r, epoch_jd, times_s)


def _group_max(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Each entry's largest value among the entries of its satellite."""
    best = np.full(n, -np.inf)
    np.maximum.at(best, owner, values)
    return best[owner]


_MEMO_SIZE = 4  # contact_windows calls remembered
_memo: OrderedDict[tuple[object, ...], Future[list[Contact]]] = OrderedDict()
_memo_lock = threading.Lock()


def _memo_key(sats: Sequence[Satellite], stations: Sequence[Station], epoch: datetime,
              duration_s: float, step_s: float, tol_s: float) -> tuple[object, ...]:
    """What the windows depend on: every satellite's name and elements, the stations, the
    span and the search's grid and tolerance."""
    elements = tuple((s.name, r.satnum, r.jdsatepoch, r.jdsatepochF, r.bstar, r.ndot, r.nddot,
                      r.ecco, r.argpo, r.inclo, r.mo, r.no_kozai, r.nodeo)
                     for s in sats for r in (s.satrec,))
    return (elements, tuple(stations), epoch, duration_s, step_s, tol_s)


def contact_windows(sats: Sequence[Satellite], stations: Sequence[Station], epoch: datetime,
                    duration_s: float, step_s: float = 30.0, tol_s: float = 1.0,
                    chunk: int = 200) -> list[Contact]:
    """Every interval in [0, duration_s] when a satellite is at or above a station's minimum
    elevation, sorted by start. Edges are refined to within `tol_s`; a window that is open at
    0 or at `duration_s` is cut there. A pass that clears the minimum only between two grid
    points is found from the sampled elevation's local maxima, down to about 0.5 s long (the
    peak search's resolution); `step_s` should stay well below a quarter of the orbital
    period, so that a grid step holds at most one turn of the elevation.

    The last few results are remembered (keyed by the satellites' elements and the other
    arguments), and a call made while the same one runs in another thread waits for it: the
    local launcher computes a scenario's windows while its node processes start, and mission
    control then takes them at once."""
    key = _memo_key(sats, stations, epoch, duration_s, step_s, tol_s)
    with _memo_lock:
        future = _memo.get(key)
        mine = future is None
        if future is None:
            future = _memo[key] = Future()
            while len(_memo) > _MEMO_SIZE:
                _memo.popitem(last=False)
        else:
            _memo.move_to_end(key)
    if not mine:
        return list(future.result())
    try:
        windows = _contact_windows(sats, stations, epoch, duration_s, step_s, tol_s, chunk)
    except BaseException as e:
        with _memo_lock:
            if _memo.get(key) is future:
                del _memo[key]
        future.set_exception(e)
        raise
    future.set_result(windows)
    return list(windows)


def _contact_windows(sats: Sequence[Satellite], stations: Sequence[Station], epoch: datetime,
                     duration_s: float, step_s: float, tol_s: float,
                     chunk: int) -> list[Contact]:
    if duration_s <= 0 or step_s <= 0 or tol_s <= 0:
        raise OrbitError("duration_s, step_s and tol_s must be > 0")
    if not stations:
        return []
    times = np.arange(0.0, duration_s + step_s, step_s)
    times[-1] = min(times[-1], duration_s)
    sites, epoch_jd = _Sites(stations), _julian(epoch)
    out: list[Contact] = []
    for first in range(0, len(sats), chunk):  # bounded memory for big constellations
        group = sats[first : first + chunk]
        pos = ecef_positions_km(group, epoch, times)  # (S, T, 3)
        el = np.stack([elevation_deg(pos, st) for st in stations], axis=1)  # (S, N, T)
        above = el >= sites.min_el[:, None]
        hidden = _hidden_peaks(group, sites, pos, el, above, step_s)
        out += _windows(group, stations, sites, epoch_jd, times, above, hidden, tol_s)
    out.sort(key=lambda c: (c.start_s, c.satellite, c.station))
    return out


def _hidden_peaks(group: Sequence[Satellite], sites: _Sites, pos: np.ndarray, el: np.ndarray,
                  above: np.ndarray, step_s: float) -> np.ndarray:
    """(S, N, T) sampled maxima of elevation `el` below the minimum whose pass may clear it
    between grid points. Within a step of a sample at range rho the line of sight turns no
    faster than k = v / (rho - v step); a peak d after a sample and step - d before its
    neighbour is at most k d above the one and k (step - d) above the other, so at most
    (e[i] + e[neighbour] + k step) / 2. That drops most sampled maxima (passes far below
    the horizon) before any search."""
    hidden = _local_maxima(el) & ~above
    s, n, t = np.nonzero(hidden)
    last = el.shape[-1] - 1
    before, after = np.where(t > 0, t - 1, 1), np.where(t < last, t + 1, last - 1)  # T >= 2
    neighbour = np.maximum(el[s, n, before], el[s, n, after])
    rho = np.linalg.norm(pos[s, t] - sites.ecef[n], axis=-1)
    reach = np.array([_speed_bound_km_s(sat) for sat in group])[s] * step_s  # km
    turn = np.degrees(reach / np.maximum(rho - reach, 1e-9))  # k step, ~inf when in reach
    hidden[s, n, t] = (el[s, n, t] + neighbour + turn) / 2 >= sites.min_el[n]
    return hidden


def _speed_bound_km_s(sat: Satellite) -> float:
    """An upper bound on the satellite's Earth-fixed speed: the two-body speed at perigee
    plus the Earth's rotation at apogee, 5% over for SGP4's perturbations (and WGS-72's mu)."""
    rec = sat.satrec
    a, r_p, r_a = (rec.radiusearthkm * x for x in (rec.a, 1 + rec.altp, 1 + rec.alta))
    return 1.05 * (math.sqrt(MU_KM3_S2 * (2 / r_p - 1 / a)) + EARTH_RATE_RAD_S * r_a)


def _local_maxima(el: np.ndarray) -> np.ndarray:
    """Samples (..., T) above the sample before and at least the sample after (an end
    compares with its one neighbour). If the curve turns once between grid points, its
    maximum lies within one step of such a sample: a peak just past a sample on the rise
    shows as the next sample being the last before the fall. A tie e[i] == e[i+1] means the
    curve turns between them, so the first of the two is flagged (its neighbours bracket
    the turn), and a plateau once, not once a sample."""
    rises = np.diff(el, axis=-1) > 0  # (..., T-1)
    peak = np.empty(el.shape, bool)
    peak[..., 0] = ~rises[..., 0]
    peak[..., 1:-1] = rises[..., :-1] & ~rises[..., 1:]
    peak[..., -1] = rises[..., -1]
    return peak


def _windows(group: Sequence[Satellite], stations: Sequence[Station], sites: _Sites,
             epoch_jd: float, times: np.ndarray, above: np.ndarray, hidden: np.ndarray,
             tol_s: float) -> list[Contact]:
    """The windows of a group of satellites at every station: all edges of all satellites
    and stations bisected at once, then the peaks of the windows and of the `hidden` sampled
    maxima (S, N, T) searched at once (each iteration one SGP4 call per satellite and one
    vectorised elevation); a hidden maximum whose peak clears the minimum is a window, its
    edges bisected from the peak. Each satellite's searches run as many iterations as they
    would alone, so the windows do not depend on which satellites share a group."""
    edges = np.diff(above.astype(np.int8), axis=-1)  # (S, N, T-1)
    s_rise, st_rise, i_rise = np.nonzero(edges == 1)  # in view from i + 1
    s_set, st_set, i_set = np.nonzero(edges == -1)  # in view until i
    owner = np.concatenate([s_rise, s_set])
    idx = np.concatenate([st_rise, st_set])
    rising = np.concatenate([np.ones(len(st_rise), bool), np.zeros(len(st_set), bool)])
    edge_t = _bisect(group, owner, sites, epoch_jd, idx, rising,
                     np.concatenate([times[i_rise], times[i_set]]),
                     np.concatenate([times[i_rise + 1], times[i_set + 1]]), tol_s)
    # per satellite and station, rises and sets in time order (nonzero is row-major)
    rise_t, set_t = edge_t[: len(s_rise)].tolist(), edge_t[len(s_rise) :].tolist()
    starts: dict[tuple[int, int], list[float]] = {}
    ends: dict[tuple[int, int], list[float]] = {}
    for key, t in zip(zip(s_rise.tolist(), st_rise.tolist(), strict=True), rise_t, strict=True):
        starts.setdefault(key, []).append(t)
    for key, t in zip(zip(s_set.tolist(), st_set.tolist(), strict=True), set_t, strict=True):
        ends.setdefault(key, []).append(t)
    open_0 = above[:, :, 0]
    open_end = above[:, :, -1]
    s_open, n_open = np.nonzero(open_0 | open_end)
    keys = set(starts) | set(ends) | set(zip(s_open.tolist(), n_open.tolist(), strict=True))
    pairs: list[tuple[int, int, float, float]] = []  # (satellite, station, start, end)
    for s, n in sorted(keys):
        a = ([0.0] if open_0[s, n] else []) + sorted(starts.get((s, n), []))
        b = sorted(ends.get((s, n), [])) + ([float(times[-1])] if open_end[s, n] else [])
        pairs += [(s, n, x, y) for x, y in zip(a, b, strict=True)]
    s_h, st_h, i_h = np.nonzero(hidden)
    lo_h = times[np.maximum(i_h - 1, 0)]  # every sample in [lo_h, hi_h] is below the minimum
    hi_h = times[np.minimum(i_h + 1, len(times) - 1)]
    if not pairs and not len(s_h):
        return []
    p_own = np.array([p[0] for p in pairs] + s_h.tolist(), dtype=np.int64)
    p_idx = np.array([p[1] for p in pairs] + st_h.tolist(), dtype=np.int64)
    p_lo = np.array([p[2] for p in pairs] + lo_h.tolist())
    p_hi = np.array([p[3] for p in pairs] + hi_h.tolist())
    peak_t, peak_el = _peaks(group, p_own, sites, epoch_jd, p_idx, p_lo, p_hi)
    out = [Contact(group[s].name, stations[n].name, a, b, float(e))
           for (s, n, a, b), e in zip(pairs, peak_el[: len(pairs)].tolist(), strict=True)]
    clear = peak_el[len(pairs) :] >= sites.min_el[st_h]
    if clear.any():  # grazing passes: below at lo_h and hi_h, in view at the peak
        s_g, n_g = s_h[clear], st_h[clear]
        t_g, el_g = peak_t[len(pairs) :][clear], peak_el[len(pairs) :][clear]
        k = len(n_g)
        rising = np.arange(2 * k) < k  # k rising edges in [lo_h, peak], then k setting
        edge_g = _bisect(group, np.concatenate([s_g, s_g]), sites, epoch_jd,
                         np.concatenate([n_g, n_g]), rising,
                         np.concatenate([lo_h[clear], t_g]),
                         np.concatenate([t_g, hi_h[clear]]), tol_s)
        out += [Contact(group[s].name, stations[n].name, float(a), float(b), float(e))
                for s, n, a, b, e in zip(s_g, n_g, edge_g[:k], edge_g[k:], el_g, strict=True)]
    return out


def _bisect(group: Sequence[Satellite], owner: np.ndarray, sites: _Sites, epoch_jd: float,
            idx: np.ndarray, rising: np.ndarray, lo: np.ndarray, hi: np.ndarray,
            tol_s: float) -> np.ndarray:
    """Horizon crossings of satellite `group[owner]` at station `idx` in [lo, hi], all at
    once, to within `tol_s`: a rising one is below at lo and in view at hi, a setting one the
    reverse. Returns the in-view side of each. A satellite's crossings are halved until all
    of them are within `tol_s`."""
    while len(lo):
        live = np.flatnonzero(_group_max(hi - lo, owner, len(group)) > tol_s)
        if not len(live):
            break
        mid = (lo[live] + hi[live]) / 2
        pos = _positions(group, owner[live], epoch_jd, mid)
        up = sites.elevation(pos, idx[live]) >= sites.min_el[idx[live]]
        move_hi = up == rising[live]
        hi[live], lo[live] = np.where(move_hi, mid, hi[live]), np.where(move_hi, lo[live], mid)
    return np.asarray(np.where(rising, hi, lo))


def _peaks(group: Sequence[Satellite], owner: np.ndarray, sites: _Sites, epoch_jd: float,
           idx: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Time and elevation of the highest point in each interval [a, b] of satellite
    `group[owner]` at station `idx`, by golden-section search to ~0.5 s (a pass has one
    maximum; a satellite's intervals are narrowed until all of them are), checked against
    the interval's ends."""
    start, end = a.copy(), b.copy()
    a, b = a.copy(), b.copy()
    while True:
        live = np.flatnonzero(_group_max(b - a, owner, len(group)) > 0.5)
        if not len(live):
            break
        al, bl = a[live], b[live]
        c, d = bl - GOLDEN * (bl - al), al + GOLDEN * (bl - al)
        own, st = owner[live], idx[live]
        el = sites.elevation(_positions(group, np.concatenate([own, own]), epoch_jd,
                                        np.concatenate([c, d])), np.concatenate([st, st]))
        left = el[: len(c)] >= el[len(c) :]
        b[live], a[live] = np.where(left, d, bl), np.where(left, al, c)
    probe = np.stack([start, (a + b) / 2, end])  # (3, P)
    el = sites.elevation(_positions(group, np.concatenate([owner] * 3), epoch_jd,
                                    probe.ravel()),
                         np.concatenate([idx] * 3)).reshape(3, -1)
    best = el.argmax(0)
    cols = np.arange(len(idx))
    return probe[best, cols], el[best, cols]


def utc(epoch: datetime, seconds: float) -> str:
    """ISO-8601 UTC of `seconds` after `epoch`, to the millisecond."""
    t = (epoch.astimezone(UTC) if epoch.tzinfo else epoch.replace(tzinfo=UTC))
    return (t + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def constellation(scenario: Scenario) -> list[Satellite]:
    """The scenario's satellites, named by its sensor ids (`sparsat.sim.scenario.schema.load` has
    made a
    TLE path relative to the scenario file absolute)."""
    o = scenario.orbits
    if o is None:
        raise OrbitError("the scenario has no `orbits` section")
    names = scenario.sensors.ids()
    if o.walker is not None:
        w = o.walker
        sats = walker_delta(w.planes, w.per_plane, w.phasing, w.altitude_km, w.inclination_deg,
                            o.epoch, scenario.sensors.prefix)
    else:
        sats = load_tle(o.tle or "")
        if len(sats) != len(names):
            raise OrbitError(f"{o.tle} holds {len(sats)} satellites, sensors.count is "
                             f"{len(names)}")
    return [Satellite(n, s.satrec) for n, s in zip(names, sats, strict=True)]


def stations(scenario: Scenario) -> list[Station]:
    if scenario.orbits is None:
        raise OrbitError("the scenario has no `orbits` section")
    return [Station(s.name, s.lat_deg, s.lon_deg, s.alt_m, s.min_elevation_deg)
            for s in scenario.orbits.stations]
