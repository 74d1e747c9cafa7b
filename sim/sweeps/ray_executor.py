"""`sparsat sweep --executor ray`: a sweep's points as Ray tasks on a Ray cluster.

Ray is an optional extra (`pip install 'sparsat[ray]'`); this module imports it only when
the executor is made. Ray does the scheduling; this is only the glue between a sweep's
points and Ray tasks:

- Each point is one Ray task (`num_cpus` each, default 1, or $SPARSAT_RAY_CPUS_PER_POINT)
  that runs the point exactly as sparsat.sim.sweeps.runner.run_point does, a `sparsat run` process,
  on
  whatever node Ray picks. No shared filesystem is assumed: the task runs the point in a
  temporary folder on its node and returns, as bytes, the files a sweep reads back (run/'s
  own files: results.json, config.yaml, history.csv, the PNGs..., run/logs/, and the point's
  run.log and status record); the driver writes them under ROOT/points/NAME/, so
  sparsat.sim.sweeps.runner.is_done, resuming and collect work as for local runs. The store and
  checkpoint
  folders stay on the node and are deleted with the temporary folder.
- The token cache is per node: the sweep's own cache folder where that path exists on the
  node (the driver's machine, or a shared disk mounted at the same path), else
  $TMPDIR/sparsat-token-cache on the node, kept between tasks (it is content-addressed, so
  sweeps may share it). No token cache when the sweep is run with --no-token-cache.
- `jobs` bounds the tasks in flight at once; 0 (or None) submits every point and lets Ray
  run as many as the cluster takes.
- With an address ("auto", "HOST:6379", "ray://HOST:10001"; else $RAY_ADDRESS) it joins that
  running cluster; otherwise it starts a local Ray instance for the sweep and shuts it down
  at the end. Every node needs sparsat installed (the same version) in the Python that runs
  Ray's workers, and the datasets where the scenario looks for them.
- A point whose run fails, or whose task raises or whose worker or node dies, is reported
  failed (status.json, with the error) and the others go on; Ray does not retry it
  (max_retries 0): running the sweep again reruns the failed points only.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsat.sim.sweeps.runner import (
    Executor,
    Point,
    SweepError,
    point_dir,
    prepare_point,
    run_point,
)

CPUS_ENV = "SPARSAT_RAY_CPUS_PER_POINT"
NODE_CACHE = "sparsat-token-cache"  # under the node's temp folder
MAX_FILE_BYTES = 64 << 20  # a run's file larger than this stays on the node
_SKIP_SUFFIXES = (".addr",)  # per-run plumbing, meaningless elsewhere


class RayExecutorError(SweepError):
    """Ray missing or its cluster unreachable (a ValueError: the CLI prints it in one line)."""


def _ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError as e:
        raise RayExecutorError(
            "the Ray executor needs Ray, an optional extra: pip install 'sparsat[ray]' "
            f"(or pip install ray) ({e})") from e


# ---- on the node -------------------------------------------------------------------------


def _node_cache(token_cache: str | None) -> Path | None:
    if token_cache is None:
        return None
    if Path(token_cache).is_dir():
        return Path(token_cache)
    cache = Path(tempfile.gettempdir()) / NODE_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _gather(folder: Path) -> dict[str, bytes]:
    """The point folder's files the driver needs, by path relative to the folder."""
    files: dict[str, bytes] = {}
    candidates = [folder / "run.log", folder / "status.json"]
    run = folder / "run"
    if run.is_dir():
        candidates += sorted(p for p in run.iterdir() if p.is_file())
        if (run / "logs").is_dir():
            candidates += sorted(p for p in (run / "logs").iterdir() if p.is_file())
    for path in candidates:
        if path.is_file() and path.suffix not in _SKIP_SUFFIXES \
                and path.stat().st_size <= MAX_FILE_BYTES:
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


def run_on_node(point: Point, token_cache: str | None) -> dict[str, Any]:
    """The Ray task's body: run_point in a temporary folder on this node; returns
    {"status": run_point's record plus the node, "files": {relative path: bytes}}."""
    node = socket.gethostname()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sparsat-point-") as tmp:
        root = Path(tmp)
        try:
            status = run_point(root, point, _node_cache(token_cache))
        except Exception as e:  # not the run's failure (that is a status): ours, say so
            status = {"status": "failed", "wall_s": time.monotonic() - t0,
                      "error": f"{type(e).__name__} on node {node}: {e}"}
        status["node"] = node
        return {"status": status, "files": _gather(point_dir(root, point))}


# ---- on the driver -----------------------------------------------------------------------


def _one_line(text: str, limit: int = 600) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = " | ".join(lines[-3:]) if lines else ""
    return line if len(line) <= limit else "..." + line[-limit:]


def _error(e: BaseException, ray: Any) -> str:
    if isinstance(e, ray.exceptions.RayTaskError) and getattr(e, "cause", None) is not None:
        e = e.cause
    return f"{type(e).__name__}: {_one_line(str(e))}"


def _write_back(folder: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write a task's files under the point's folder, results.json last, then status.json
    (the task's status record, with the node that ran it)."""
    status = dict(result["status"])
    files: dict[str, bytes] = result.get("files") or {}
    files.pop("status.json", None)  # rewritten from `status`
    order = sorted(files, key=lambda rel: rel == "run/results.json")
    inside = folder.resolve()
    for rel in order:
        target = (folder / rel).resolve()
        if inside not in target.parents:
            continue  # never outside the point's folder
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[rel])
    (folder / "status.json").write_text(json.dumps(status, indent=1))
    return status


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT address (ray:// or not) that takes no TCP connection is an error now,
    not minutes of Ray's own retries."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or address == "auto":
        return  # "auto", "local", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayExecutorError(
            f"could not connect to the Ray cluster at {address!r}: {host}:{port} takes no "
            f"connection ({e}); is the cluster running, and is the address its head's "
            "(HOST:6379, or ray://HOST:10001 for Ray Client)?") from e


def _connect(ray: Any, address: str | None, cpus: float) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), or start a local instance; returns
    whether we started one (and so shut it down). A Ray already initialised here is used."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"logging_level": logging.WARNING}
    if address:
        _probe(address)
        try:
            ray.init(address=address, **quiet)
        except Exception as e:
            raise RayExecutorError(
                f"could not connect to the Ray cluster at {address!r}: {_one_line(str(e))} "
                "(is it running? `ray status --address ...` on a node tells)") from e
        return False
    n = max(os.cpu_count() or 1, int(cpus + 0.999))
    try:
        # "local": a new instance of our own, never someone's `ray start` on this machine
        ray.init(address="local", num_cpus=n, include_dashboard=False, **quiet)
    except Exception as e:
        raise RayExecutorError(f"could not start a local Ray instance: {_one_line(str(e))}") \
            from e
    return True


def ray_executor(root: Path, jobs: int | None, token_cache: Path | None, address: str | None,
                 num_cpus: float | None = None) -> Executor:
    """An Executor (sparsat.sim.sweeps.runner.local_executor's contract) running each point as a
    Ray task;
    on_done is called in this process as each point finishes. Raises RayExecutorError now
    if Ray is not installed; connects when called."""
    ray = _ray()
    cpus = float(num_cpus if num_cpus is not None else os.environ.get(CPUS_ENV) or 1)
    if cpus <= 0:
        raise RayExecutorError(f"CPUs per point must be > 0, got {cpus}")
    limit = jobs if jobs and jobs > 0 else None

    def execute(points: list[Point], on_done: Callable[[Point, dict[str, Any]], None]) -> None:
        if not points:
            return
        if token_cache is not None:
            token_cache.mkdir(parents=True, exist_ok=True)  # so this machine's tasks share it
        started = _connect(ray, address, cpus)
        task = ray.remote(run_on_node).options(num_cpus=cpus, max_retries=0,
                                               name="sparsat-point")
        cache = str(token_cache) if token_cache is not None else None
        queue = list(points)
        pending: dict[Any, tuple[Point, float]] = {}
        try:
            while queue or pending:
                while queue and (limit is None or len(pending) < limit):
                    point = queue.pop(0)
                    folder = prepare_point(root, point)
                    shutil.rmtree(folder / "run", ignore_errors=True)  # an earlier attempt
                    pending[task.remote(point, cache)] = (point, time.monotonic())
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    point, t0 = pending.pop(ref)
                    folder = point_dir(root, point)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # the task raised, its worker or node died...
                        result = {"status": {"status": "failed",
                                             "wall_s": time.monotonic() - t0,
                                             "error": _error(e, ray)}}
                    on_done(point, _write_back(folder, result))
        finally:
            for ref in pending:  # interrupted: stop what still runs
                try:
                    ray.cancel(ref)
                except Exception:
                    pass
            if started:
                ray.shutdown()
    return execute
