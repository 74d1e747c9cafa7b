"""The node commands: `sparsat ground-station`, `sparsat node sensor`, `sparsat node trainer`.

sparsat.sim.cli adds them to `sparsat` (add_commands); a node the launcher starts runs them
from here, `python -m sparsat.sim.deploy.nodes ARGS` or main(ARGS) in a forked child, with
the same command line and none of the rest of the CLI, so nothing here imports
sparsat.sim.cli. Also the security flags and credentials every command that dials or serves
shares (`sparsat run --ground-station` too), and the one way a command runs: logging, SIGTERM
as Ctrl-C, a one-line error for the errors users make. Module level imports the standard
library only: `sparsat --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DESCRIPTION = "sparsat: simulated satellite-constellation edge learning"


def add_security(p: argparse.ArgumentParser, who: str) -> None:
    g = p.add_argument_group("security (TLS and node identity; see `sparsat certs`)")
    g.add_argument("--certs", metavar="DIR",
                   help=f"{who}'s credentials folder made by `sparsat certs` (ca.crt, node.crt, "
                        "node.key, token)")
    g.add_argument("--tls-cert", metavar="FILE", help="this node's certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    g.add_argument("--tls-ca", metavar="FILE", help="the deployment's CA certificate (PEM)")
    g.add_argument("--token", metavar="FILE", help="this node's identity token")
    g.add_argument("--revoked", metavar="FILE",
                   help="the deployment's revocation list (`sparsat certs` writes it as "
                        "DIR/NODE/revoked; --certs reads it from there)")
    g.add_argument("--mtls", action="store_true",
                   help="mutual TLS: servers require client certificates of the deployment")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext, no authentication: only on a network you trust")


def configure_security(args: argparse.Namespace, role: str,
                       name: str | None = None) -> str | None:
    """Set this process's credentials from the flags; returns the node name they carry (None
    with --insecure). `role`: the role the credentials must have; `name`: the node name the
    command was given, which must match."""
    from sparsat.node.wire import security

    files = [args.tls_cert, args.tls_key, args.tls_ca, args.token]
    if args.insecure:
        if args.certs or any(files) or args.mtls or args.revoked:
            raise ValueError("--insecure takes no credentials (--certs, --tls-*, --token, "
                             "--revoked, --mtls)")
        logging.getLogger("sparsat").warning(
            "--insecure: plaintext gRPC without authentication; anyone who can reach this "
            "node's port can use it")
        security.configure(None)
        return None
    if args.certs:
        if any(files):
            raise ValueError("give --certs DIR or --tls-cert/--tls-key/--tls-ca/--token, not both")
        if args.revoked:
            raise ValueError("--certs DIR reads DIR/revoked; --revoked goes with --tls-*")
        creds = security.Credentials.from_dir(Path(args.certs), args.mtls)
    elif all(files):
        creds = security.Credentials.from_files(Path(args.tls_ca), Path(args.tls_cert),
                                                Path(args.tls_key), Path(args.token),
                                                args.mtls,
                                                Path(args.revoked) if args.revoked else None)
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


def cmd_ground_station(args: argparse.Namespace) -> int:
    from sparsat.ground_station.server import serve
    from sparsat.sim.scenario.configs import ground_station_config
    from sparsat.sim.scenario.schema import load

    configure_security(args, "ground_station")
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
    name = configure_security(args, "sensor", args.node_id)
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

    import os

    cache = args.token_cache or os.environ.get("SPARSAT_TOKEN_CACHE")
    serve(args.listen, args.ground_station, args.id, args.node_id, args.advertise,
          Path(cache).expanduser() if cache else None)
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    from sparsat.node.processes.trainer import serve

    _register_wait(args)
    name = configure_security(args, "trainer", args.id)
    args.id = args.id or name

    serve(args.listen, args.ground_station, args.device, args.id, args.threads, args.advertise)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The node commands, `ground-station` and `node sensor|trainer`, as subcommands of `sub`."""
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
    add_security(gs, "the ground station")
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
    sensor.add_argument("--token-cache", metavar="DIR",
                        help="on-board tokens of batches encoded before, shared with other "
                        "runs (simulation speed only; default $SPARSAT_TOKEN_CACHE, else none)")
    add_security(sensor, "the sensor host")
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
    add_security(trainer, "the trainer")
    trainer.set_defaults(func=cmd_trainer)


def top_parser() -> tuple[argparse.ArgumentParser,
                          argparse._SubParsersAction[argparse.ArgumentParser]]:
    """`sparsat [--log-level L] COMMAND`, no commands yet: they are added to the second."""
    p = argparse.ArgumentParser(prog="sparsat", description=DESCRIPTION)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return p, sub


def parser() -> argparse.ArgumentParser:
    """The node commands alone, as a node process started by the launcher parses them."""
    p, sub = top_parser()
    add_commands(sub)
    return p


def node_errors() -> tuple[type[Exception], ...]:
    """The errors the node commands report in one line: the user's scenario, files, flags,
    and a peer that cannot be reached or refuses."""
    from sparsat.node.wire.rpc import Refused, Unreachable
    from sparsat.sim.scenario.schema import ScenarioError

    return (ScenarioError, FileNotFoundError, ValueError, Unreachable, Refused)


def execute(p: argparse.ArgumentParser, argv: Sequence[str] | None,
            known: Callable[[], tuple[type[Exception], ...]] = node_errors) -> int:
    """Parse `argv` with `p` and run the command it names: its exit code. `known()`: the
    errors printed as one line (imported only once one happened); others, and every one
    with --log-level debug, raise with their trace."""
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # SIGTERM behaves like Ctrl-C, so `finally` blocks stop child processes
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a one-line error for users; --log-level debug shows the trace
        if isinstance(e, known()) and args.log_level != "debug":
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def main(argv: Sequence[str] | None = None) -> int:
    return execute(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
