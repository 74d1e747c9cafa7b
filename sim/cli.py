"""The `sparsat` command line: every service is runnable from here; the CLI only wires."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

DESCRIPTION = "sparsat: simulated satellite-constellation edge learning"


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _add_security(p: argparse.ArgumentParser, who: str) -> None:
    g = p.add_argument_group("security (TLS and node identity; see `sparsat certs`)")
    g.add_argument("--certs", metavar="DIR",
                   help=f"{who}'s credentials folder made by `sparsat certs` (ca.crt, node.crt, "
                        "node.key, token)")
    g.add_argument("--tls-cert", metavar="FILE", help="this node's certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    g.add_argument("--tls-ca", metavar="FILE", help="the deployment's CA certificate (PEM)")
    g.add_argument("--token", metavar="FILE", help="this node's identity token")
    g.add_argument("--mtls", action="store_true",
                   help="mutual TLS: servers require client certificates of the deployment")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext, no authentication: only on a network you trust")


def _configure_security(args: argparse.Namespace, role: str,
                        name: str | None = None) -> str | None:
    """Set this process's credentials from the flags; returns the node name they carry (None
    with --insecure). `role`: the role the credentials must have; `name`: the node name the
    command was given, which must match."""
    from sparsat.node.wire import security

    files = [args.tls_cert, args.tls_key, args.tls_ca, args.token]
    if args.insecure:
        if args.certs or any(files) or args.mtls:
            raise ValueError("--insecure takes no credentials (--certs, --tls-*, --token, --mtls)")
        logging.getLogger("sparsat").warning(
            "--insecure: plaintext gRPC without authentication; anyone who can reach this "
            "node's port can use it")
        security.configure(None)
        return None
    if args.certs:
        if any(files):
            raise ValueError("give --certs DIR or --tls-cert/--tls-key/--tls-ca/--token, not both")
        creds = security.Credentials.from_dir(Path(args.certs), args.mtls)
    elif all(files):
        creds = security.Credentials.from_files(Path(args.tls_ca), Path(args.tls_cert),
                                                Path(args.tls_key), Path(args.token),
                                                args.mtls)
    elif any(files):
        raise ValueError("--tls-cert, --tls-key, --tls-ca and --token go together")
    else:
        raise ValueError("no credentials: pass --certs DIR (made by `sparsat certs`), or "
                         "--insecure for plaintext without authentication")
    ident = creds.identity
    if ident.role != role:
        raise ValueError(f"the credentials are {ident.name}'s, a {ident.role}; this command "
                         f"needs a {role}'s")
    if name is not None and name != ident.name:
        raise ValueError(f"node id {name[:64]!r} differs from the credentials' node name "
                         f"{ident.name!r}")
    security.configure(creds)
    return ident.name


def cmd_certs(args: argparse.Namespace) -> int:
    from sparsat.sim.deploy.certs import make_deployment, parse_node, scenario_nodes
    from sparsat.sim.scenario.schema import load

    nodes = scenario_nodes(load(args.scenario), args.trainers) if args.scenario else []
    nodes += [parse_node(n) for n in args.node or []]
    if not nodes:
        raise ValueError("give --scenario FILE and/or --node ROLE:NAME[:SATS]")
    hosts: dict[str, tuple[str, ...]] = {}
    for item in args.san or []:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--san takes NODE=HOST[,HOST...] (NODE may be *), got {item!r}")
        hosts[name] = hosts.get(name, ()) + tuple(v for v in values.split(",") if v)
    out = Path(args.out)
    folders = make_deployment(out, nodes, hosts, args.days)
    for node, folder in zip(nodes, folders, strict=True):
        extra = f" satellites {','.join(node.satellites)}" if node.satellites else ""
        print(f"{node.role:14} {node.name:20} {folder}{extra}")
    print(f"CA in {out / 'ca'} (keep ca.key off the nodes); start each node with "
          f"--certs {out}/NODE")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sparsat.sim.deploy.launcher import LocalCluster
    from sparsat.sim.mission import report
    from sparsat.sim.mission.control import MissionControl
    from sparsat.sim.scenario.schema import dump, load

    if args.resume:
        if args.scenario or args.out:
            raise ValueError("--resume DIR takes the scenario from DIR/config.yaml and writes "
                             "to DIR: give neither a scenario nor --out")
        out = Path(args.resume)
        if not (out / "config.yaml").exists():
            raise FileNotFoundError(f"nothing to resume: {out / 'config.yaml'} not found")
        scenario = load(out / "config.yaml")
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
        _configure_security(args, "operator")
        results = MissionControl(scenario, args.ground_station, show, state_file=state,
                                 resume=bool(args.resume)).run()
    else:
        # the token cache: --token-cache, else (resuming) the one the run used, recorded in
        # OUT/token_cache.txt, else $SPARSAT_TOKEN_CACHE, else none (the store's own folder)
        import os

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


def cmd_contacts(args: argparse.Namespace) -> int:
    import csv
    import time

    from sparsat.sim.scenario.schema import load
    from sparsat.sim.space import orbits

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


def cmd_ground_station(args: argparse.Namespace) -> int:
    from sparsat.ground_station.server import serve
    from sparsat.sim.scenario.configs import ground_station_config
    from sparsat.sim.scenario.schema import load

    _configure_security(args, "ground_station")
    scenario = load(args.scenario)
    store = Path(args.store or f"runs/{scenario.name}/store")
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if args.resume and checkpoints is None:
        raise ValueError("--resume needs --checkpoint-dir")
    import os

    cache = args.token_cache or os.environ.get("SPARSAT_TOKEN_CACHE")
    serve(ground_station_config(scenario, store, checkpoints, args.resume,
                                Path(cache).expanduser() if cache else None), args.listen,
          Path(args.port_file) if args.port_file else None)
    return 0


def _register_wait(args: argparse.Namespace) -> None:
    from sparsat.node.wire import rpc

    if args.register_wait <= 0:
        raise ValueError("--register-wait must be > 0 seconds")
    rpc.REGISTER_WAIT_S = args.register_wait


def cmd_sensor(args: argparse.Namespace) -> int:
    from sparsat.node.processes.sensor import serve
    from sparsat.node.wire import security

    _register_wait(args)
    name = _configure_security(args, "sensor", args.node_id)
    creds = security.active()
    if creds is None and not args.id:
        raise ValueError("give the satellites this host serves: --id SAT (repeat)")
    if creds is not None:
        args.node_id = name
        args.id = args.id or list(creds.identity.satellites)  # default: all it may serve
        stray = [s for s in args.id if s not in creds.identity.satellites]
        if stray:
            raise ValueError(f"{name}'s credentials do not cover satellites {stray[:8]} (they "
                             f"cover {list(creds.identity.satellites)[:8]})")

    serve(args.listen, args.ground_station, args.id, args.node_id, args.advertise)
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    from sparsat.node.processes.trainer import serve

    _register_wait(args)
    name = _configure_security(args, "trainer", args.id)
    args.id = args.id or name

    serve(args.listen, args.ground_station, args.device, args.id, args.threads, args.advertise)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    import numpy as np

    from sparsat.node.data.datasets import DatasetSpec, load_dataset
    from sparsat.node.models.encoders import config
    from sparsat.node.models.pretrain import DecoderConfig, PretrainConfig, pretrain
    from sparsat.node.models.training import resolve_device

    resolve_device(args.device)  # an unavailable device fails before the dataset is read

    cfg = PretrainConfig(encoder=args.encoder, dataset=args.dataset, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, mask_ratio=args.mask_ratio,
                         seed=args.seed,
                         decoder=DecoderConfig(args.decoder_dim, args.decoder_depth, 4),
                         warmup_epochs=args.warmup_epochs,
                         init=str(Path(args.init).resolve()) if args.init else None)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = load_dataset(DatasetSpec(args.dataset, root=args.data_root), "train")
    size = config(args.encoder).img_size
    if data.image_shape is None or data.image_shape[:2] != (size, size):
        raise ValueError(f"pretraining needs {size}x{size} images; {args.dataset} has "
                         f"{data.image_shape}")
    # training images only, labels never read
    images = np.stack([data.image(i) for i in range(len(data))])
    out = pretrain(images, cfg, Path(args.out), stop_after=args.stop_after, device=args.device)
    print(f"encoder weights: {out}" if out else "stopped; resume with the same command")
    return 0


def cmd_clouds(args: argparse.Namespace) -> int:
    from dataclasses import replace

    args.size = args.size or [28, 256]
    from sparsat.node.data.clouds import PRESETS, example_figure
    from sparsat.sim.scenario.schema import load

    if args.scenario:
        scenario = load(args.scenario)
        if scenario.sensors.mask.kind != "clouds":
            raise ValueError(f"{args.scenario}: sensors.mask.kind is "
                             f"{scenario.sensors.mask.kind}, not clouds")
        spec = scenario.sensors.mask.cloud_spec()
    else:
        spec = PRESETS[args.preset]
    if args.roughness is not None:
        spec = replace(spec, roughness=args.roughness)
    if args.n < 1 or any(s < 2 for s in args.size):
        raise ValueError("--n must be >= 1 and every --size >= 2")
    example_figure(Path(args.out), spec, n=args.n, sizes=tuple(args.size), seed=args.seed)
    print(f"{args.n} example scenes ({spec.cover_mean:.2f} mean cover, {spec.clear_share:.2f} "
          f"clear, {spec.overcast_share:.2f} overcast, roughness {spec.roughness}) in {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import json as _json
    import shutil
    import time

    from tqdm import tqdm

    from sparsat.sim.sweeps import runner as sw

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
    (out / "sweep_status.json").write_text(_json.dumps({
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsat", description=DESCRIPTION)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a scenario: start the nodes locally, drive the mission")
    run.add_argument("scenario", nargs="?", help="scenario YAML file")
    run.add_argument("--out", help="output directory (default runs/<scenario name>)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR from its last checkpoint (after the "
                          "downlink: from the last training round)")
    run.add_argument("--ground-station", metavar="HOST:PORT",
                     help="drive an already running deployment instead of starting one")
    run.add_argument("--device", help="trainer device for local trainers (auto, cpu, cuda)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--token-cache", metavar="DIR",
                     help="encoded splits, shared with other runs (default $SPARSAT_TOKEN_CACHE, "
                          "else the run's store; --resume: the run's own)")
    _add_security(run, "the operator (with --ground-station; a local run makes its own)")
    run.set_defaults(func=cmd_run)

    pre = sub.add_parser("pretrain", help="MAE-pretrain an encoder on unlabelled images")
    pre.add_argument("--encoder", default="vit_tiny_d8_patch4_28")  # encoders.DEFAULT_ENCODER
    pre.add_argument("--dataset", default="fashion_mnist")
    pre.add_argument("--data-root", help="dataset root (default $SPARSAT_DATA or the cache)")
    pre.add_argument("--epochs", type=int, default=32)
    pre.add_argument("--batch-size", type=int, default=256)
    pre.add_argument("--lr", type=float, default=1e-3)
    pre.add_argument("--mask-ratio", type=float, default=0.75)
    pre.add_argument("--warmup-epochs", type=int, default=1)
    pre.add_argument("--init", metavar="LAST_PT",
                     help="continue from an earlier run's last.pt (same encoder) with a new "
                          "learning-rate schedule; a different decoder starts fresh")
    pre.add_argument("--decoder-dim", type=int, default=96)
    pre.add_argument("--decoder-depth", type=int, default=1)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--threads", type=int, help="CPU threads for torch")
    pre.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    pre.add_argument("--stop-after", type=int, help="stop after this many epochs (resumable)")
    pre.add_argument("--out", required=True,
                     help="work directory: checkpoints (resumed from), encoder.pt, pretrain.json")
    pre.set_defaults(func=cmd_pretrain)

    con = sub.add_parser("contacts", help="contact windows of the scenario's constellation (SGP4)")
    con.add_argument("scenario", help="scenario YAML file with an `orbits` section")
    con.add_argument("--hours", type=float, default=24.0, help="span from the epoch (default 24)")
    con.add_argument("--out", required=True, metavar="FILE.csv", help="windows CSV")
    con.add_argument("--step", type=float, help="coarse search grid, s (default orbits.step_s)")
    con.add_argument("--tle-out", metavar="FILE", help="also write the constellation as TLEs")
    con.add_argument("--stations-out", metavar="FILE.csv", help="also write the stations")
    con.set_defaults(func=cmd_contacts)

    cl = sub.add_parser("clouds", help="write a picture of example cloud masks")
    cl.add_argument("--out", required=True, metavar="FILE.png")
    cl.add_argument("--scenario", help="take the climatology from this scenario's mask")
    cl.add_argument("--preset", default="global", choices=["global", "land", "ocean"])
    cl.add_argument("--roughness", type=float, help="override the edge roughness (0..1)")
    cl.add_argument("--n", type=int, default=8, help="scenes (default 8)")
    cl.add_argument("--size", type=int, action="append",
                    help="resolutions to draw each scene at (default 28 and 256)")
    cl.add_argument("--seed", type=int, default=0)
    cl.set_defaults(func=cmd_clouds, size=None)

    sw = sub.add_parser("sweep", help="run a grid of scenarios (each point a full run)")
    sw.add_argument("sweep", nargs="?", help="sweep YAML file (base scenario + grid)")
    sw.add_argument("--out", help="output directory (default runs/sweeps/<sweep name>)")
    sw.add_argument("--jobs", type=int, default=1, help="points run at a time (default 1)")
    sw.add_argument("--dry-run", action="store_true", help="print the points, run nothing")
    sw.add_argument("--shard", metavar="i/n", help="run only the points i, i+n, i+2n... of "
                    "the name-ordered grid (0 <= i < n)")
    sw.add_argument("--collect", nargs="+", metavar="DIR",
                    help="gather these sweep folders' points into sweep.csv, summary.md, "
                    "figures (in --out, default the first DIR); runs nothing")
    sw.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="local processes, or tasks on a Ray cluster (pip install sparsat[ray])")
    sw.add_argument("--address", help="Ray cluster address (default: ray.init's own)")
    sw.add_argument("--no-token-cache", action="store_true",
                    help="do not share encoded tokens between points (OUT/token_cache)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.set_defaults(func=cmd_sweep)

    ce = sub.add_parser("certs", help="make a deployment's CA and every node's credentials")
    ce.add_argument("out", metavar="DIR", help="where to write DIR/ca and DIR/NODE folders "
                    "(an existing CA there is reused)")
    ce.add_argument("--scenario", help="make the nodes `sparsat run` would start for this "
                    "scenario (ground-station, trainer-K, sensors-H, operator)")
    ce.add_argument("--trainers", type=int, help="trainers to make (default: training.num_workers)")
    ce.add_argument("--node", action="append", metavar="ROLE:NAME[:SAT,...]",
                    help="another node: ground_station, trainer, sensor (with its satellites) or "
                         "operator; repeat")
    ce.add_argument("--san", action="append", metavar="NODE=HOST[,HOST]",
                    help="extra DNS names or IPs in NODE's certificate (NODE * for all), for "
                         "other tools (grpcurl); sparsat nodes check names, not addresses")
    ce.add_argument("--days", type=int, default=365, help="validity (default 365)")
    ce.set_defaults(func=cmd_certs)

    gs = sub.add_parser("ground-station", help="serve the ground station")
    gs.add_argument("--listen", default="0.0.0.0:50051", metavar="HOST:PORT")
    gs.add_argument("--scenario", required=True, help="scenario YAML file")
    gs.add_argument("--store", help="sample store directory (default runs/<name>/store)")
    gs.add_argument("--port-file", help="write the bound HOST:PORT here once serving")
    gs.add_argument("--checkpoint-dir", help="checkpoint the coordinator here every round")
    gs.add_argument("--resume", action="store_true",
                    help="continue training from the checkpoint in --checkpoint-dir")
    gs.add_argument("--token-cache", metavar="DIR",
                    help="content-addressed cache of encoded splits, may be shared by runs "
                         "(default $SPARSAT_TOKEN_CACHE, else STORE/tokens)")
    _add_security(gs, "the ground station")
    gs.set_defaults(func=cmd_ground_station)

    node = sub.add_parser("node", help="serve a sensor or trainer node")
    kinds = node.add_subparsers(dest="kind", required=True, metavar="KIND")
    sensor = kinds.add_parser("sensor", help="host one or more satellites")
    sensor.add_argument("--id", action="append", metavar="SAT",
                        help="satellite id from the scenario (repeat to host several; default "
                             "with --certs: every satellite the credentials cover)")
    sensor.add_argument("--ground-station", required=True, metavar="HOST:PORT")
    sensor.add_argument("--listen", default="0.0.0.0:0", metavar="HOST:PORT")
    sensor.add_argument("--node-id", help="this process's node id (default from the first --id)")
    sensor.add_argument("--advertise", metavar="HOST[:PORT]",
                        help="the address other nodes dial (default: the listen address; with "
                             "0.0.0.0, this machine's address toward the ground station)")
    sensor.add_argument("--register-wait", type=float, default=60.0, metavar="S",
                        help="how long to wait for the ground station at start (default 60)")
    _add_security(sensor, "the sensor host")
    sensor.set_defaults(func=cmd_sensor)
    trainer = kinds.add_parser("trainer", help="train MLP subnets sent by the ground station")
    trainer.add_argument("--listen", default="0.0.0.0:50052", metavar="HOST:PORT")
    trainer.add_argument("--ground-station", metavar="HOST:PORT", help="register here")
    trainer.add_argument("--id", help="node id (default: random)")
    trainer.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    trainer.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    trainer.add_argument("--advertise", metavar="HOST[:PORT]",
                         help="the address the ground station dials (default: the listen "
                              "address; with 0.0.0.0, this machine's address toward the ground "
                              "station)")
    trainer.add_argument("--register-wait", type=float, default=60.0, metavar="S",
                        help="how long to wait for the ground station at start (default 60)")
    _add_security(trainer, "the trainer")
    trainer.set_defaults(func=cmd_trainer)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _logging(args.log_level)
    # SIGTERM behaves like Ctrl-C, so `finally` blocks stop child processes
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a one-line error for users; --log-level debug shows the trace
        from sparsat.node.wire.rpc import Refused, Unreachable
        from sparsat.sim.deploy.launcher import LaunchError
        from sparsat.sim.mission.control import MissionError
        from sparsat.sim.scenario.schema import ScenarioError

        known = (ScenarioError, MissionError, LaunchError, FileNotFoundError, ValueError,
                 Unreachable, Refused)
        if isinstance(e, known) and args.log_level != "debug":
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
