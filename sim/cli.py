"""The `sparsat` command line: every service is runnable from here; the CLI only wires.

Each command's body lives in the room that does its job: `run` in sparsat.sim.mission.run,
`contacts` in sparsat.sim.space.contacts, `sweep` in sparsat.sim.sweeps.sweep, `certs` in
sparsat.sim.deploy.certs, `pretrain` in sparsat.sim.deploy.pretrain, `clouds` in
sparsat.sim.scenario.clouds, the node commands (`ground-station`, `node sensor|trainer`) in
sparsat.sim.deploy.nodes, which a node the launcher starts runs without this module. Those
modules are imported when their command runs: `sparsat --help` imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sparsat.sim.deploy import nodes

DESCRIPTION = nodes.DESCRIPTION


def cmd_run(args: argparse.Namespace) -> int:
    from sparsat.sim.mission.run import cmd_run

    return cmd_run(args)


def cmd_contacts(args: argparse.Namespace) -> int:
    from sparsat.sim.space.contacts import cmd_contacts

    return cmd_contacts(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from sparsat.sim.sweeps.sweep import cmd_sweep

    return cmd_sweep(args)


def cmd_certs(args: argparse.Namespace) -> int:
    from sparsat.sim.deploy.certs import cmd_certs

    return cmd_certs(args)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from sparsat.sim.deploy.pretrain import cmd_pretrain

    return cmd_pretrain(args)


def cmd_clouds(args: argparse.Namespace) -> int:
    from sparsat.sim.scenario.clouds import cmd_clouds

    return cmd_clouds(args)


def parser() -> argparse.ArgumentParser:
    p, sub = nodes.top_parser()

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
    nodes.add_security(run, "the operator (with --ground-station; a local run makes its own)")
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

    nodes.add_commands(sub)  # ground-station, node sensor|trainer
    return p


def _errors() -> tuple[type[Exception], ...]:
    from sparsat.sim.deploy.launcher import LaunchError
    from sparsat.sim.mission.ground_client import MissionError

    return (*nodes.node_errors(), MissionError, LaunchError)


def main(argv: Sequence[str] | None = None) -> int:
    return nodes.execute(parser(), argv, _errors)


if __name__ == "__main__":
    sys.exit(main())
