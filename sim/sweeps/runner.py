"""`sparsat sweep`: a grid of scenarios around a base one, each point a full `sparsat run`.

A sweep file names a base scenario and a grid of overrides by dotted key:

    name: masks
    base: ../scenarios/quickstart.yaml       # relative to the sweep file
    set: {training.epochs: 3}                # overrides every point shares (optional)
    grid:
      sensors.mask.kind: [fixed, random, clouds]
      sensors.mask.ratio: [0, 0.25, 0.5, 0.75, 0.9]
      seed: [0, 1, 2]
    zip: [[sensors.payload.kind, sensors.payload.cls_dtype]]   # keys that vary together
    exclude: [{sensors.mask.kind: clouds, sensors.mask.ratio: [0.9]}]   # points left out

A value of null removes the key (the schema's default applies), e.g. a cls_dtype zipped with
a payload kind that takes none.
The points are the product of the grid's axes (a zip group is one axis), less the excluded
ones. Every point's scenario is validated before anything runs; an unknown key or a value the
schema refuses is an error naming the point. Each point runs as `sparsat run` in a process of
its own, in OUT/points/NAME/ (scenario.yaml, run/ with results.json, run.log, status.json);
a point whose run/results.json is there and whose run/config.yaml is its resolved scenario is
done and not run again, so an interrupted sweep continues where it stopped. `--shard i/n` runs
the points whose index in name order is i modulo n (any scheduler can spread a sweep so:
a Slurm array, Kubernetes jobs), and `--collect DIR...` gathers the points' results into
sweep.csv, summary.md and the figures (sparsat.sim.sweeps.report).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sparsat.sim.scenario.schema import Scenario, dump

SWEEP_KEYS = ("name", "base", "set", "grid", "zip", "exclude")
POINT_TIMEOUT_S = 6 * 3600.0  # one point's `sparsat run`, at most


class SweepError(ValueError):
    pass


@dataclass(frozen=True)
class Point:
    name: str
    overrides: dict[str, Any]  # the point's grid values by dotted key, in grid order
    resolved: dict[str, Any]  # its validated scenario, as `sparsat run` writes config.yaml

    @property
    def yaml(self) -> str:
        return dump(Scenario.model_validate(self.resolved))


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    grid_keys: list[str]
    points: list[Point]


# ---- the sweep file ---------------------------------------------------------------------------


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep file, validating every point's scenario (SweepError)."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown}; a sweep file has "
                         f"{', '.join(SWEEP_KEYS)}")
    if "base" not in raw or "grid" not in raw:
        raise SweepError(f"{path}: `base` (a scenario file) and `grid` are required")
    base_path = (path.parent / str(raw["base"])).resolve()
    if not base_path.exists():
        raise SweepError(f"{path}: base scenario {base_path} not found")
    base = yaml.safe_load(base_path.read_text()) or {}
    _absolute_tle(base, base_path.parent)
    shared = _mapping(raw.get("set") or {}, "set", path)
    grid = _mapping(raw["grid"], "grid", path)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values")
    zips = _zips(raw.get("zip") or [], grid, path)
    excludes = _excludes(raw.get("exclude") or [], [*grid, *shared], path)
    name = str(raw.get("name") or path.stem)
    points = []
    for overrides in expand(grid, zips):
        if any(_matches(rule, {**shared, **overrides}) for rule in excludes):
            continue
        points.append(_point(base, shared, overrides, grid))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise SweepError(f"{path}: two points would share a folder name: {names}")
    if not points:
        raise SweepError(f"{path}: every point is excluded")
    return Sweep(name, path, list(grid), points)


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SweepError(f"{path}: `{what}` must map dotted keys to values")
    return dict(value)


def _zips(raw: Any, grid: dict[str, list[Any]], path: Path) -> list[list[str]]:
    if not isinstance(raw, list) or not all(isinstance(g, list) for g in raw):
        raise SweepError(f"{path}: `zip` is a list of lists of grid keys")
    seen: set[str] = set()
    for group in raw:
        missing = [k for k in group if k not in grid]
        if missing:
            raise SweepError(f"{path}: zip keys {missing} are not in the grid")
        if seen & set(group):
            raise SweepError(f"{path}: zip keys {sorted(seen & set(group))} are in two groups")
        seen |= set(group)
        lengths = {k: len(grid[k]) for k in group}
        if len(set(lengths.values())) > 1:
            raise SweepError(f"{path}: zipped keys need lists of one length, got {lengths}")
    return [list(g) for g in raw]


def _excludes(raw: Any, keys: list[str], path: Path) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise SweepError(f"{path}: `exclude` is a list of mappings (key: value or [values])")
    for rule in raw:
        stray = [k for k in rule if k not in keys]
        if stray:
            raise SweepError(f"{path}: exclude keys {stray} are neither in the grid nor `set`")
    return list(raw)


def _matches(rule: dict[str, Any], values: dict[str, Any]) -> bool:
    return all(values.get(k) in (v if isinstance(v, list) else [v]) for k, v in rule.items())


def expand(grid: dict[str, list[Any]], zips: list[list[str]]) -> Iterable[dict[str, Any]]:
    """The grid's points in a fixed order: the product of its axes (each zip group one axis),
    axes in the grid's key order; each point's values in grid order."""
    zipped = {k: g for g in zips for k in g}
    axes: list[list[list[tuple[str, Any]]]] = []
    done: set[str] = set()
    for key in grid:
        if key in done:
            continue
        group = zipped.get(key, [key])
        done |= set(group)
        axes.append([[(k, grid[k][i]) for k in group] for i in range(len(grid[key]))])
    for combo in itertools.product(*axes):
        values = dict(pair for part in combo for pair in part)
        yield {k: values[k] for k in grid}


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key; None removes it (the schema's default applies)."""
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SweepError(f"{dotted}: {part} is not a section")
        node = child
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def _absolute_tle(tree: dict[str, Any], folder: Path) -> None:
    orbits = tree.get("orbits")
    if isinstance(orbits, dict) and isinstance(orbits.get("tle"), str):
        if not Path(orbits["tle"]).is_absolute():
            orbits["tle"] = str((folder / orbits["tle"]).resolve())


def _label(key: str, grid: dict[str, list[Any]]) -> str:
    """The shortest tail of a dotted key that no other grid key shares."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if all(not k.endswith(tail) or k == key for k in grid):
            return tail
    return key


def _point(base: dict[str, Any], shared: dict[str, Any], overrides: dict[str, Any],
           grid: dict[str, list[Any]]) -> Point:
    name = "_".join(f"{_label(k, grid)}={v}" for k, v in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", name)[:200] or "point"
    tree = json.loads(json.dumps(base, default=str))  # a deep copy (YAML dates as text)
    try:
        for key, value in {**shared, **overrides}.items():
            _set(tree, key, value)
        tree["name"] = name
        scenario = Scenario.model_validate(tree)
    except (ValidationError, SweepError) as e:
        raise SweepError(f"point {name}: {e}") from e
    return Point(name, overrides, scenario.model_dump(mode="json"))


# ---- running the points ---------------------------------------------------------------------


def shard(points: list[Point], spec: str) -> list[Point]:
    """`i/n`: the points whose index in name order is i modulo n (0 <= i < n)."""
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise SweepError(f"--shard takes i/n with 0 <= i < n, got {spec!r}")
    i, n = int(m[1]), int(m[2])
    return [p for k, p in enumerate(sorted(points, key=lambda p: p.name)) if k % n == i]


def point_dir(root: Path, point: Point) -> Path:
    return root / "points" / point.name


def is_done(root: Path, point: Point) -> bool:
    """Its results are there and were made from this very scenario."""
    run = point_dir(root, point) / "run"
    if not (run / "results.json").exists() or not (run / "config.yaml").exists():
        return False
    try:
        return bool(yaml.safe_load((run / "config.yaml").read_text()) == point.resolved)
    except yaml.YAMLError:
        return False


def prepare_point(root: Path, point: Point) -> Path:
    """Write the point's folder (scenario.yaml, point.json); returns the folder."""
    folder = point_dir(root, point)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scenario.yaml").write_text(point.yaml)
    (folder / "point.json").write_text(json.dumps(
        {"name": point.name, "overrides": point.overrides}, indent=1))
    return folder


def run_point(root: Path, point: Point, token_cache: Path | None = None,
              timeout_s: float = POINT_TIMEOUT_S) -> dict[str, Any]:
    """Run one point as `sparsat run` in a process of its own; returns its status record
    (also written to status.json): status done | failed, wall_s, and the error."""
    folder = prepare_point(root, point)
    run = folder / "run"
    shutil.rmtree(run, ignore_errors=True)  # a half-finished earlier attempt
    cmd = [sys.executable, "-m", "sparsat.sim.cli", "run", str(folder / "scenario.yaml"),
           "--out", str(run), "--quiet"]
    if token_cache is not None:
        cmd += ["--token-cache", str(token_cache)]
    t0 = time.monotonic()
    error = ""
    with open(folder / "run.log", "wb") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code, error = -1, f"timed out after {timeout_s:.0f} s"
    wall = time.monotonic() - t0
    ok = code == 0 and (run / "results.json").exists()
    if not ok and not error:
        tail = (folder / "run.log").read_text(errors="replace").strip().splitlines()[-3:]
        error = f"exit code {code}: " + " | ".join(tail)
    status = {"status": "done" if ok else "failed", "wall_s": wall, "error": error}
    (folder / "status.json").write_text(json.dumps(status, indent=1))
    return status


Executor = Callable[[list[Point], Callable[[Point, dict[str, Any]], None]], None]


def local_executor(root: Path, jobs: int, token_cache: Path | None) -> Executor:
    """Points `jobs` at a time, each its own `sparsat run` process on this machine."""
    def execute(points: list[Point], on_done: Callable[[Point, dict[str, Any]], None]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(run_point, root, p, token_cache): p for p in points}
            for future in as_completed(futures):
                on_done(futures[future], future.result())
    return execute


# ---- collecting -----------------------------------------------------------------------------


def collect(dirs: list[Path], out: Path, spec: Sweep | None = None) -> list[Path]:
    """Gather the points under each DIR/points/ (one sweep's shards, on a shared disk or
    copied together) into OUT/sweep.csv, summary.md and the figures, in the grid's order when
    `spec` is given (else by name); a point of `spec` found nowhere is listed as missing.
    Returns the files written."""
    from sparsat.sim.sweeps.report import point_row, write_outputs

    found: dict[str, dict[str, Any]] = {}
    for root in dirs:
        if not (root / "points").is_dir():
            raise SweepError(f"{root}: no points/ folder: not a sweep's output")
        for folder in sorted(p for p in (root / "points").iterdir() if p.is_dir()):
            row = _row(folder, point_row)
            if row is not None and (folder.name not in found or row["status"] == "done"):
                found[folder.name] = row
    keys = list(spec.grid_keys) if spec else []
    if spec is not None:
        for p in spec.points:
            if p.name not in found:
                found[p.name] = point_row(p.name, p.overrides, p.resolved, None, "missing",
                                          None)
    if not keys:
        for row in found.values():
            keys += [k for k in row.get("_overrides", {}) if k not in keys]
    order = {p.name: i for i, p in enumerate(spec.points)} if spec else {}
    rows = [found[k] for k in sorted(found, key=lambda k: (order.get(k, len(order)), k))]
    for row in rows:
        row.pop("_overrides", None)
    out.mkdir(parents=True, exist_ok=True)
    return write_outputs(out, rows, keys)


def _row(folder: Path, point_row: Callable[..., dict[str, Any]]) -> dict[str, Any] | None:
    try:
        info = json.loads((folder / "point.json").read_text())
        scenario = yaml.safe_load((folder / "scenario.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None  # not a point's folder
    status = {}
    if (folder / "status.json").exists():
        status = json.loads((folder / "status.json").read_text())
    run = folder / "run"
    results = None
    if (run / "results.json").exists() and (run / "config.yaml").exists() and yaml.safe_load(
            (run / "config.yaml").read_text()) == scenario:
        results = json.loads((run / "results.json").read_text())
    state = "done" if results else ("failed" if status.get("status") == "failed" else "missing")
    row = point_row(info["name"], info["overrides"], scenario, results, state,
                    status.get("wall_s"))
    row["_overrides"] = info["overrides"]
    return row
