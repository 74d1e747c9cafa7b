"""Start a whole deployment as local processes on free localhost ports, and stop it.

The ground station binds port 0 and writes its address to a file; trainers and sensor hosts
bind port 0 too and register their addresses with it. Every child is stopped on exit,
including on error or Ctrl-C.

Each node is a `sparsat` node command (sparsat.sim.deploy.nodes) in a process of its own.
Where the platform has it, the processes are forked from a multiprocessing fork server that
has imported the third-party libraries the nodes use (torch, timm, gRPC...: ~3.5 CPU seconds
a process) once, instead of each child importing them again: a constellation's sensor hosts
start in a fraction of the time on a few cores. Only libraries are preloaded, and only
imported (no gRPC channel, no torch work before a fork); sparsat's own modules are imported by
each child (0.1 s), so their module-level state (sparsat.node.wire.rpc.INSTANCE, a node's
identity) is each process's own, and numpy's global generator is seeded afresh as in a new
interpreter. A forked node ends the way multiprocessing ends a child, with os._exit once its
command returns (streams flushed): atexit handlers do not run (sparsat registers none).
SPARSAT_LAUNCH=exec starts every node as a fresh interpreter (`python -m
sparsat.sim.deploy.nodes`) instead. While the nodes start, the contact windows of an orbital
scenario are computed in a thread (mission control then takes them from
sparsat.sim.space.orbits' memo instead of computing them after the nodes are up).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType

from sparsat.node.wire import security
from sparsat.node.wire.security import Credentials
from sparsat.sim.scenario.schema import Scenario

log = logging.getLogger("sparsat.launcher")
START_TIMEOUT_S = 120.0
# what the fork server imports before it forks a node: the libraries behind every `sparsat`
# node command, none of which starts threads or opens gRPC channels on import; not sparsat's
# own modules (their module-level state must be each process's own)
PRELOAD = ["numpy", "torch", "torchvision", "timm", "grpc", "google.protobuf", "pydantic",
           "yaml", "simpy", "sgp4.api", "tqdm"]
_preload_lock = threading.Lock()


def _forkserver() -> multiprocessing.context.BaseContext | None:
    """The fork-server context with the node code preloaded, or None (no fork server on this
    platform, or SPARSAT_LAUNCH=exec)."""
    if os.environ.get("SPARSAT_LAUNCH", "fork") == "exec":
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    with _preload_lock:  # only takes effect if the fork server is not running yet
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _node_main(name: str, args: list[str], log_path: str, cwd: str,
               env: dict[str, str]) -> None:
    """A forked node: the launcher's environment and directory, output to its log, then the
    node command line, as `python -m sparsat.sim.deploy.nodes ARGS` would run it. Its command
    line in `ps` is the fork server's; its name (`ps -o comm`, top) is the node's."""
    try:
        Path("/proc/self/comm").write_text(name[:15])  # Linux: the kernel's 15-byte name
    except OSError:
        pass
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import numpy as np

    np.random.seed()  # as a new interpreter would: not the fork server's state
    from sparsat.sim.deploy.nodes import main

    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class ForkedNode:
    """A node forked by the fork server, with the subprocess.Popen calls the launcher and
    its callers use: pid, poll(), wait(), terminate(), kill(), returncode."""

    def __init__(self, process: BaseProcess) -> None:
        self.process = process
        assert process.pid is not None
        self.pid: int = process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"node {self.pid}", timeout or 0.0)
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()


Proc = subprocess.Popen[bytes] | ForkedNode


def start_node(name: str, args: list[str], log_path: Path) -> Proc:
    """`sparsat ARGS`, a node command (ground-station, node sensor|trainer), as a node
    process logging to `log_path`: forked from the fork server that has imported the
    libraries once (a start costs ~0.1 CPU s, not the ~3.5 s of importing torch again), or a
    fresh interpreter where there is none (SPARSAT_LAUNCH=exec)."""
    ctx = _forkserver()
    if ctx is not None:
        process = ctx.Process(  # type: ignore[attr-defined]
            target=_node_main, name=name, daemon=False,
            args=(name, args, str(log_path), os.getcwd(), dict(os.environ)))
        process.start()
        return ForkedNode(process)
    with open(log_path, "wb") as log:  # the child has its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "sparsat.sim.deploy.nodes", *args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


class LaunchError(RuntimeError):
    pass


class LocalCluster:
    """`secure` (default): a throw-away CA and credentials for every node in OUT/certs, made
    afresh each start, so every local run speaks TLS with node tokens like a deployment; while
    the cluster runs, this process (mission control) holds the operator's credentials.
    `secure=False`: plaintext, no authentication (`sparsat run --insecure`)."""

    def __init__(self, scenario: Scenario, scenario_file: Path, out_dir: Path,
                 resume: bool = False, token_cache: Path | None = None,
                 secure: bool = True, mutual: bool = False) -> None:
        self.s = scenario
        self.secure, self.mutual = secure, mutual
        self.certs = out_dir / "certs"
        self._previous: Credentials | None = None  # this process's before start()
        self.resume = resume  # keep the store and the coordinator's checkpoint
        self.token_cache = token_cache  # encoded splits shared with other runs (None: store's)
        self.scenario_file = scenario_file
        self.out_dir = out_dir
        self.log_dir = out_dir / "logs"
        self.procs: dict[str, Proc] = {}
        self.args: dict[str, list[str]] = {}  # each node's command line, for restart()
        self._exited: set[str] = set()  # nodes whose exit was reported
        self.address = ""
        self.contacts_s: float | None = None  # wall seconds of the contact windows, computed
        self._contacts: threading.Thread | None = None  # while the nodes start

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        if name in self.args and log_path.exists():  # restarted: keep its earlier life's log
            log_path.rename(self.log_dir / f"{name}.{len(list(self.log_dir.glob(name + '.*')))}"
                            ".log")
        self.args[name] = args
        self._exited.discard(name)
        self.procs[name] = start_node(name, args, log_path)
        return self.procs[name]

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise when the ground station has exited: nothing goes on without it. A sensor
        host or trainer that exited is only reported (once): mission control waits for a
        sensor host to come back, and the coordinator trains without a lost trainer."""
        for name, proc in self.procs.items():
            if proc.poll() is None or name in self._exited:
                continue
            if name == "ground-station":
                raise LaunchError(f"{name} exited with code {proc.returncode}:\n"
                                  f"{self.log_tail(name)}")
            self._exited.add(name)
            log.warning("%s exited with code %s; the run goes on without it:\n%s", name,
                        proc.returncode, self.log_tail(name, 5))

    def kill(self, name: str) -> None:
        """Kill node `name` at once (SIGKILL, as a crash or a power cut would), for tests."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._exited.add(name)

    def restart(self, name: str) -> Proc:
        """Start node `name` again (killed first if it still runs) with its command line: the
        same store, credentials and node id. The ground station comes back on the address it
        had (its port), with --resume, so the coordinator continues from its checkpoint."""
        if self.procs[name].poll() is None:
            self.kill(name)
        args = list(self.args[name])
        if name == "ground-station":
            args[args.index("--listen") + 1] = self.address
            if "--resume" not in args:
                args.append("--resume")
        return self._spawn(name, args)

    def _prefetch_contacts(self) -> None:
        """The contact windows mission control will ask for (same arguments), into
        sparsat.sim.space.orbits' memo; a failure is left for mission control to raise."""
        from sparsat.sim.space import orbits

        o = self.s.orbits
        assert o is not None
        t0 = time.monotonic()
        try:
            orbits.contact_windows(orbits.constellation(self.s), orbits.stations(self.s),
                                   o.epoch, self.s.mission.window_span_s(), o.step_s,
                                   o.tolerance_s)
        except Exception:  # noqa: BLE001 - mission control computes them again and says why
            return
        self.contacts_s = time.monotonic() - t0

    def _credentials(self) -> None:
        """Fresh credentials for every node this scenario starts (and spares for trainers
        started later), and the operator's for this process."""
        from sparsat.sim.deploy.certs import NodeSpec, make_deployment, scenario_nodes

        shutil.rmtree(self.certs, ignore_errors=True)
        spares = [NodeSpec(f"trainer-{k}", "trainer") for k in
                  range(self.s.training.num_workers, self.s.training.num_workers + 4)]
        # nodes dial each other by name (channel(peer=...)); 127.0.0.1 too for callers that
        # dial by address alone
        make_deployment(self.certs, scenario_nodes(self.s) + spares, {"*": ("127.0.0.1",)},
                        days=30)
        self._previous = security.active()
        security.configure(Credentials.from_dir(self.certs / "operator", self.mutual))

    def _security_args(self, name: str) -> list[str]:
        if not self.secure:
            return ["--insecure"]
        return ["--certs", str(self.certs / name), *(["--mtls"] if self.mutual else [])]

    def start(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            self._credentials()
        if self.s.orbits is not None and not self.resume:
            self._contacts = threading.Thread(target=self._prefetch_contacts,
                                              name="contact-windows", daemon=True)
            self._contacts.start()
        port_file = self.out_dir / "ground_station.addr"
        port_file.unlink(missing_ok=True)
        if not self.resume:
            # a new run starts from an empty store (old samples would be acked as duplicates)
            # and without an old checkpoint
            shutil.rmtree(self.out_dir / "store", ignore_errors=True)
            shutil.rmtree(self.out_dir / "checkpoint", ignore_errors=True)
        self._spawn("ground-station", [
            "ground-station", "--listen", "127.0.0.1:0", "--scenario", str(self.scenario_file),
            "--store", str(self.out_dir / "store"), "--port-file", str(port_file),
            "--checkpoint-dir", str(self.out_dir / "checkpoint"),
            *(["--resume"] if self.resume else []),
            *(["--token-cache", str(self.token_cache)] if self.token_cache else []),
            *self._security_args("ground-station")])
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise LaunchError(f"ground station did not start in {START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        self.address = port_file.read_text().strip()
        for k in range(self.s.training.num_workers):
            self.spawn_trainer(f"trainer-{k}")
        sats = self.s.sensors.ids()
        per = self.s.sensors.per_process
        for h, start in enumerate(range(0, len(sats), per)):
            ids = [a for sat in sats[start : start + per] for a in ("--id", sat)]
            self._spawn(f"sensors-{h}", [
                "node", "sensor", "--listen", "127.0.0.1:0", "--ground-station", self.address,
                "--node-id", f"sensors-{h}", *ids,
                *(["--token-cache", str(self.token_cache)] if self.token_cache else []),
                *self._security_args(f"sensors-{h}")])
        return self.address

    def spawn_trainer(self, node_id: str, name: str | None = None) -> Proc:
        """Start a trainer process that registers with the ground station as `node_id`."""
        t = self.s.training
        # the scenario's thread count (training.threads): the bits of trainers started
        # elsewhere; the trainer applies it again when the ground station tells it
        threads = t.threads
        return self._spawn(name or node_id, [
            "node", "trainer", "--listen", "127.0.0.1:0", "--ground-station", self.address,
            "--id", node_id, "--device", t.device, "--threads", str(threads),
            *self._security_args(node_id)])

    def stop(self) -> None:
        if self.secure:
            security.configure(self._previous)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
