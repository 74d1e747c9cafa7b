"""Start a whole deployment as local processes on free localhost ports, and stop it.

The ground station binds port 0 and writes its address to a file; trainers and sensor hosts
bind port 0 too and register their addresses with it. Every child is stopped on exit,
including on error or Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from sim.scenario import Scenario

START_TIMEOUT_S = 120.0


class LaunchError(RuntimeError):
    pass


class LocalCluster:
    def __init__(self, scenario: Scenario, scenario_file: Path, out_dir: Path,
                 resume: bool = False) -> None:
        self.s = scenario
        self.resume = resume  # keep the store and the coordinator's checkpoint
        self.scenario_file = scenario_file
        self.out_dir = out_dir
        self.log_dir = out_dir / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.address = ""

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "sim.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise LaunchError(f"{name} exited with code {proc.returncode}:\n"
                                  f"{self.log_tail(name)}")

    def start(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
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
            *(["--resume"] if self.resume else [])])
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
                "--node-id", f"sensors-{h}", *ids])
        return self.address

    def spawn_trainer(self, node_id: str, name: str | None = None) -> subprocess.Popen[bytes]:
        """Start a trainer process that registers with the ground station as `node_id`."""
        t = self.s.training
        # the workers of a round run at once: share this machine's cores between them
        threads = max(1, (os.cpu_count() or 1) // t.num_workers)
        return self._spawn(name or node_id, [
            "node", "trainer", "--listen", "127.0.0.1:0", "--ground-station", self.address,
            "--id", node_id, "--device", t.device, "--threads", str(threads)])

    def stop(self) -> None:
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
