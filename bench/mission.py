"""Mission benchmark: one whole mission at constellation scale, wall time per stage.

Run from the repo root: .venv/bin/python bench/mission.py [--satellites 1000] [--images N]
    [--test-images N] [--epochs 2] [--per-process 250] [--hours 24] [--rate 1e6]
    [--precision float32|bfloat16]
    [--out runs/bench_mission] [--profile] [--smoke]
Builds a scenario (written to OUT/scenario.yaml) from scenarios/constellation.yaml with the
flags' sizes: a Walker-delta of --satellites (planes of 25, 550 km, 53°) over the five
stations of bench/orbits.py (two antennas each), --hours of contact windows; Fashion-MNIST,
--images training images (default all 60,000) split across the satellites, patch payloads
with a fixed mask at r = 0.5, downlinks at --rate; IST with K = 2 for --epochs epochs,
evaluated on --test-images (default all 10,000) test images. Then runs it exactly as
`sparsat run` does (sparsat.sim.deploy.launcher.LocalCluster +
sparsat.sim.mission.control.MissionControl: real node
processes, real gRPC) and reports the wall seconds of each stage:
  startup   node processes started, registered and serving (the launcher's start-up)
  contacts  contact windows of the whole constellation (mission control, in this process;
            the launcher computes them while the nodes start: contacts_during_startup_s)
  downlink  every satellite's Transmit calls: masking, payloads, gRPC, ingest, the SimPy clock
  prepare   the ground station's encoder stage (training and test images)
  training  the IST epochs (rounds over gRPC to the trainers, evaluation)
  report    results.json, config.yaml, history.csv and the plots
  shutdown  node processes stopped
and, sampled from /proc every --sample seconds, the CPU seconds each process spent in each
stage (the `top` view: which process is busy while a stage runs). --profile runs mission
control under cProfile (OUT/mission_control.prof) and prints its top functions.
Ends with one JSON line of its figures, also written to OUT/bench_mission.json.
--smoke: 10 satellites (5 a sensor process), 300 training and 200 test images, 1 epoch,
6 h of contact windows, no progress bars: the same processes and stages in seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sparsat.bench import parse_args  # noqa: E402
from sparsat.node.models.encoders import _cpu_flags  # noqa: E402
from sparsat.sim.deploy.launcher import LocalCluster  # noqa: E402
from sparsat.sim.mission import report  # noqa: E402
from sparsat.sim.mission.control import MissionControl  # noqa: E402
from sparsat.sim.scenario.schema import Scenario, dump, load  # noqa: E402

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "constellation.yaml"
STAGES = ("startup", "contacts", "downlink", "prepare", "training", "report", "shutdown")
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split
SMOKE = {"satellites": 10, "per_process": 5, "images": 300, "test_images": 200, "epochs": 1,
         "hours": 6.0, "quiet": True}


def scenario(args: argparse.Namespace) -> Scenario:
    """scenarios/constellation.yaml with the flags' sizes."""
    per_plane = min(25, args.satellites)
    if args.satellites % per_plane:
        raise SystemExit(f"--satellites must be a multiple of 25 (or at most 25), "
                         f"got {args.satellites}")
    planes = args.satellites // per_plane
    s = load(SCENARIO).model_dump(mode="json")
    s["dataset"].update(train_subset=None if args.images in (None, 0, TRAIN_IMAGES)
                        else args.images, test_subset=args.test_images or None)
    s["sensors"].update(count=args.satellites, per_process=args.per_process)
    s["orbits"].update(step_s=args.step)
    s["mission"] = {"horizon_h": args.hours}
    s["orbits"]["walker"].update(planes=planes, per_plane=per_plane,
                                 phasing=1 if planes > 1 else 0)
    s["links"]["downlink"].update(rate_bps=args.rate, loss=args.loss)
    s["training"].update(epochs=args.epochs)
    s["encoder"]["precision"] = args.precision
    return Scenario.model_validate(s)


def _cpu_s(pid: int) -> float | None:
    """utime + stime of a process (its threads included), seconds; None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler(threading.Thread):
    """Samples the CPU seconds of the node processes and of this one (mission control)."""

    def __init__(self, cluster: LocalCluster, every_s: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.every_s = cluster, every_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.halt = threading.Event()
        self.sample()  # the baseline: this process's CPU so far, no node yet

    def sample(self) -> None:
        now = time.monotonic()
        cpu = {"mission-control": time.process_time()}
        for name, proc in list(self.cluster.procs.items()):
            c = _cpu_s(proc.pid)
            if c is not None:
                cpu[name] = c
        self.samples.append((now, cpu))

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.sample()

    def at(self, t: float) -> dict[str, float]:
        """The last sample at or before `t` (CPU counters only grow)."""
        best: dict[str, float] = {}
        for when, cpu in self.samples:
            if when > t:
                break
            best = cpu
        return best

    def per_stage(self, bounds: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
        """CPU seconds of each process role (sensors, trainers summed) within each stage."""
        out: dict[str, dict[str, float]] = {}
        for stage, (a, b) in bounds.items():
            start, end = self.at(a), self.at(b)
            roles: dict[str, float] = {}
            for name, c in end.items():
                role = name.rsplit("-", 1)[0] if name[-1].isdigit() else name
                roles[role] = roles.get(role, 0.0) + c - start.get(name, 0.0)
            out[stage] = {k: round(v, 1) for k, v in sorted(roles.items())}
        return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = scenario(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "config.yaml"  # as `sparsat run` writes it, and the nodes read it
    resolved.write_text(dump(s))
    (out / "scenario.yaml").write_text(dump(s))
    state = out / "mission_state.json"
    state.unlink(missing_ok=True)
    profiler = cProfile.Profile() if args.profile else None
    t0 = time.monotonic()
    cluster = LocalCluster(s, resolved, out)
    sampler = CpuSampler(cluster, args.sample)
    sampler.start()
    with cluster:
        spawned = time.monotonic()
        mc = MissionControl(s, cluster.address, show_progress=not args.quiet,
                            alive=cluster.check_alive, state_file=state)
        if profiler is not None:
            profiler.enable()
        results = mc.run()
        if profiler is not None:
            profiler.disable()
        ran = time.monotonic()
        processes = len(cluster.procs)
    stopped = time.monotonic()
    report.write(out, s, results)
    reported = time.monotonic()
    sampler.stop()
    stage = dict(results["stage_wall_s"])
    # mission control's clock: _wall0 when it starts waiting for the nodes, _downlink_wall0
    # once the contact windows are computed and the satellites' processes are made
    registered = mc._downlink_wall0 - stage["contacts"]
    walls = {"startup": registered - t0, "contacts": stage["contacts"],
             "downlink": stage["downlink"], "prepare": stage["prepare"],
             "training": stage["training"], "report": reported - stopped,
             "shutdown": stopped - ran}
    a = mc._downlink_wall0
    bounds = {"startup": (t0, registered), "contacts": (registered, a),
              "downlink": (a, a + stage["downlink"]),
              "prepare": (a + stage["downlink"], a + stage["downlink"] + stage["prepare"]),
              "training": (a + stage["downlink"] + stage["prepare"], ran),
              "report": (stopped, reported), "shutdown": (ran, stopped)}
    total = reported - t0
    images = s.dataset.train_subset or TRAIN_IMAGES
    figures: dict[str, Any] = {
        "satellites": s.sensors.count, "stations": len(s.orbits.stations) if s.orbits else 0,
        "hours": args.hours,
        "images": images, "test_images": results["samples"]["test"], "epochs": args.epochs,
        "per_process": args.per_process, "processes": processes,
        "sensor_processes": -(-s.sensors.count // args.per_process),
        "rate_bps": args.rate, "loss": args.loss,
        # the CPU's instruction sets the encoder stage can use (bfloat16: encoder.precision)
        "cpu_flags": sorted(_cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                            "amx_tile", "avx512_vnni"}),
        "encoder_precision": results.get("encoder_precision"),
        "stage_wall_s": {k: round(v, 2) for k, v in walls.items()},
        "total_wall_s": round(total, 2),
        "spawn_s": round(spawned - t0, 2),
        # the launcher computes the contact windows in a thread while the nodes start; then
        # mission control's `contacts` stage only takes them
        "contacts_during_startup_s": (round(cluster.contacts_s, 2)
                                      if cluster.contacts_s is not None else None),
        "stage_cpu_s": sampler.per_stage(bounds),
        "samples_sent": results["samples"]["sent"],
        "samples_stored": results["samples"]["stored"],
        "downlink_bytes": results["bytes"]["downlink"],
        "trainer_bytes": results["bytes"]["trainer"],
        "rounds": results["round_bytes"]["rounds"],
        "mission_time_h": round(results["sim_time_s"] / 3600, 3),
        "downlink_done_h": round(results["downlink_done_s"] / 3600, 3),
        "final_accuracy": results["final_accuracy"],
        "accuracy_by_epoch": [h["accuracy"] for h in results["history"]],
    }
    if profiler is not None:
        profiler.dump_stats(out / "mission_control.prof")
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
        figures["profile"] = str(out / "mission_control.prof")
        print(text.getvalue(), file=sys.stderr)
    return figures


def table(f: dict[str, Any]) -> str:
    roles = sorted({r for v in f["stage_cpu_s"].values() for r in v})
    head = f"{'stage':<10} {'wall s':>8} {'share':>6}  " + " ".join(
        f"{r + ' cpu s':>22}" for r in roles)
    lines = [head]
    for k in STAGES:
        w = f["stage_wall_s"][k]
        cpu = f["stage_cpu_s"].get(k, {})
        lines.append(f"{k:<10} {w:>8.2f} {w / f['total_wall_s']:>6.1%}  " + " ".join(
            f"{cpu.get(r, 0.0):>22.1f}" for r in roles))
    lines.append(f"{'total':<10} {f['total_wall_s']:>8.2f} {1:>6.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--satellites", type=int, default=1000, help="a multiple of 25, or <= 25")
    p.add_argument("--images", type=int, default=None,
                   help="training images (default: all 60,000)")
    p.add_argument("--test-images", type=int, default=None,
                   help="test images evaluated (default: all 10,000)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--per-process", type=int, default=250, help="satellites per sensor process")
    p.add_argument("--hours", type=float, default=24.0, help="contact-window horizon, h")
    p.add_argument("--step", type=float, default=30.0, help="contact search grid, s")
    p.add_argument("--rate", type=float, default=1e6, help="downlink rate, bit/s")
    p.add_argument("--loss", type=float, default=0.01, help="downlink frame loss")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="encoder.precision (bfloat16 where the CPU has it natively)")
    p.add_argument("--out", default="runs/bench_mission")
    p.add_argument("--sample", type=float, default=0.5, help="CPU sampling period, s")
    p.add_argument("--profile", action="store_true", help="cProfile mission control")
    p.add_argument("--top", type=int, default=25, help="profile lines printed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parse_args(p, argv, SMOKE)
    print(f"mission bench: {args.satellites} satellites ({args.per_process} per sensor "
          f"process), 5 stations, {args.hours:g} h horizon (grid {args.step:g} s), "
          f"{args.images or TRAIN_IMAGES:,} training images, {args.test_images or 10_000:,} test "
          f"images, {args.epochs} epochs, downlink "
          f"{args.rate / 1e6:g} Mbit/s with {args.loss:.0%} frame loss, out {args.out}",
          file=sys.stderr)
    f = main_figures = run(args)
    print(table(f))
    print(f"{f['satellites']} satellites, {f['images']:,} images -> {f['samples_stored']:,} "
          f"stored, {f['epochs']} epochs ({f['rounds']} IST rounds), accuracy "
          f"{f['final_accuracy']:.4f}; mission time {f['mission_time_h']:.2f} h (downlink done "
          f"at {f['downlink_done_h']:.2f} h); wall {f['total_wall_s']:.1f} s "
          f"on {os.cpu_count()} cores")
    print(f"CPU: {' '.join(f['cpu_flags']) or 'none of avx2/avx512/amx'}; encoder precision "
          f"{f['encoder_precision']}")
    Path(args.out, "bench_mission.json").write_text(json.dumps(main_figures, indent=2) + "\n")
    print(json.dumps(main_figures))
    return main_figures


if __name__ == "__main__":
    main()
