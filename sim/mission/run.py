"""`sparsat run`: one scenario's mission, on nodes started here (a LocalCluster) or on a
deployment already running elsewhere (--ground-station), its results written to OUT."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sparsat.sim.deploy.launcher import LocalCluster
from sparsat.sim.deploy.nodes import configure_security
from sparsat.sim.mission import report
from sparsat.sim.mission.control import MissionControl
from sparsat.sim.scenario.schema import dump, load


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.scenario or args.out:
            raise ValueError("--resume DIR takes the scenario from DIR/config.yaml and writes "
                             "to DIR: give neither a scenario nor --out")
        out = Path(args.resume)
        if not (out / "config.yaml").exists():
            raise FileNotFoundError(f"nothing to resume: {out / 'config.yaml'} not found")
        scenario = load(out / "config.yaml")
        if scenario.training.streaming:
            raise ValueError(
                f"{out} is a streaming mission (training.schedule {scenario.training.schedule!r}"
                "): streaming missions cannot be resumed yet (the ground station keeps what "
                "each update encoded in memory); run it again from the start")
    elif not args.scenario:
        raise ValueError("give a scenario file, or --resume DIR")
    else:
        scenario = load(args.scenario)
        out = Path(args.out or f"runs/{scenario.name}")
    if args.device:
        scenario = scenario.model_copy(update={
            "training": scenario.training.model_copy(update={"device": args.device})})
    out.mkdir(parents=True, exist_ok=True)
    if args.ground_station and args.token_cache:
        raise ValueError("--token-cache is for a local run: give it to the ground station")
    resolved = out / "config.yaml"
    resolved.write_text(dump(scenario))
    show = not args.quiet
    state = out / "mission_state.json"
    if not args.resume:
        state.unlink(missing_ok=True)
    if args.ground_station:  # a deployment already running elsewhere
        configure_security(args, "operator")
        results = MissionControl(scenario, args.ground_station, show, state_file=state,
                                 resume=bool(args.resume)).run()
    else:
        # the token cache: --token-cache, else (resuming) the one the run used, recorded in
        # OUT/token_cache.txt, else $SPARSAT_TOKEN_CACHE, else none (the store's own folder)
        record = out / "token_cache.txt"
        chosen = args.token_cache or (record.read_text().strip() if args.resume
                                      and record.exists() else "")
        chosen = chosen or os.environ.get("SPARSAT_TOKEN_CACHE", "")
        token_cache = Path(chosen).expanduser().resolve() if chosen else None
        if token_cache:
            record.write_text(f"{token_cache}\n")
        else:
            record.unlink(missing_ok=True)
        if args.certs or args.tls_cert or args.tls_key or args.tls_ca or args.token:
            raise ValueError("a local run makes its own throw-away credentials (OUT/certs): "
                             "--certs and --tls-* are for --ground-station")
        with LocalCluster(scenario, resolved, out, resume=bool(args.resume),
                          token_cache=token_cache, secure=not args.insecure,
                          mutual=args.mtls) as cluster:
            if show:
                print(f"started {len(cluster.procs)} node processes; logs in {out / 'logs'}",
                      file=sys.stderr)
            results = MissionControl(scenario, cluster.address, show,
                                     alive=cluster.check_alive, state_file=state,
                                     resume=bool(args.resume)).run()
    report.write(out, scenario, results)
    print(report.summary(results))
    print(f"results in {out}/results.json")
    return 0
