"""`sparsat sweep`: run a sweep's points (all, or a shard) on an executor, then gather them;
or only gather folders of points already run (--collect), or list them (--dry-run)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from sparsat.sim.sweeps import runner as sw


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.collect:
        spec = sw.load_sweep(args.sweep) if args.sweep else None
        dirs = [Path(d) for d in args.collect]
        written = sw.collect(dirs, Path(args.out) if args.out else dirs[0], spec)
        print("\n".join(str(p) for p in written))
        return 0
    if not args.sweep:
        raise ValueError("give a sweep file, or --collect DIR")
    spec = sw.load_sweep(args.sweep)
    points = sw.shard(spec.points, args.shard) if args.shard else spec.points
    if args.dry_run:
        for p in points:
            print(f"{p.name}\t" + " ".join(f"{k}={v}" for k, v in p.overrides.items()))
        print(f"{len(points)} of {len(spec.points)} points", file=sys.stderr)
        return 0
    out = Path(args.out or f"runs/sweeps/{spec.name}")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.path, out / "sweep.yaml")
    todo = [p for p in points if not sw.is_done(out, p)]
    for p in points:
        sw.prepare_point(out, p)
    cache = None if args.no_token_cache else (out / "token_cache").resolve()
    if args.executor == "ray":
        from sparsat.sim.sweeps.ray_executor import ray_executor

        execute = ray_executor(out, args.jobs, cache, args.address)
    else:
        execute = sw.local_executor(out, args.jobs, cache)
    print(f"sweep {spec.name}: {len(points)} points ({len(points) - len(todo)} already done), "
          f"{args.jobs} at a time, {args.executor}; in {out}", file=sys.stderr)
    failed: list[str] = []
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=args.quiet)

    def on_done(point: sw.Point, status: dict[str, object]) -> None:
        bar.update(1)
        if status["status"] != "done":
            failed.append(point.name)
            bar.write(f"point {point.name} failed: {status.get('error')}")

    t0 = time.monotonic()
    try:
        execute(todo, on_done)
    finally:
        bar.close()
    wall = time.monotonic() - t0
    (out / "sweep_status.json").write_text(json.dumps({
        "points": len(points), "run": len(todo), "skipped": len(points) - len(todo),
        "failed": failed, "wall_s": wall, "jobs": args.jobs, "executor": args.executor,
        "token_cache": str(cache) if cache else None, "shard": args.shard}, indent=1))
    print(f"{len(todo) - len(failed)} points run, {len(points) - len(todo)} skipped (done), "
          f"{len(failed)} failed, in {wall:.1f} s")
    if args.shard:
        print(f"shard {args.shard} done; gather the shards with: sparsat sweep {args.sweep} "
              f"--collect {out} [OTHER_SHARD_DIRS...]")
    else:
        for path in sw.collect([out], out, spec):
            print(path)
    return 1 if failed else 0
