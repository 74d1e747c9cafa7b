"""Separate machines on one host: Linux network namespaces joined by a bridge.

`Network(["gs", "trainer-0", ...])` makes one namespace per machine, each with its own
address on a private /24 (10.X.0.2, .3, ...), all plugged into a bridge that lives in a
namespace of its own, so the host's own network is never touched and traffic never leaves the
test's namespaces. Leaving the `with` block (also on failure) kills every process still
running in them and deletes the namespaces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`, a container without the rights)."""


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if r.returncode:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Network:
    def __init__(self, machines: Sequence[str], octet: int | None = None) -> None:
        self.tag = f"sp{os.getpid() % 100000}"
        self.octet = octet if octet is not None else 200 + os.getpid() % 50
        self.machines = list(machines)
        self.ns = {m: f"{self.tag}-{m}"[:40] for m in machines}
        self.addr = {m: f"10.{self.octet}.0.{k + 2}" for k, m in enumerate(machines)}
        self.bridge_ns = f"{self.tag}-switch"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []
        self._etc: list[Path] = []

    def __enter__(self) -> Network:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def _make(self) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for k, m in enumerate(self.machines):
            ns = self.ns[m]
            _ip("netns", "add", ns)
            self._made.append(ns)
            port = f"p{k}"
            _ip("-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name",
                "eth0", "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[m]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # each machine resolves the others by name: `ip netns exec` mounts
        # /etc/netns/NS/hosts over /etc/hosts inside the namespace
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {m}\n" for m, a in self.addr.items())
        for ns in self.ns.values():
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            self._etc.append(folder)
            (folder / "hosts").write_text(hosts)

    def popen(self, machine: str, argv: Sequence[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` on `machine` (in its namespace), output to `log`."""
        with open(log, "ab") as f:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns[machine], *argv],
                                    stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, machine: str, argv: Sequence[str], timeout: float,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns[machine], *argv],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)

    def pids(self, machine: str) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.ns[machine]], capture_output=True,
                           text=True, timeout=10)
        return [int(p) for p in r.stdout.split()]

    def kill(self, machine: str, sig: int = signal.SIGKILL) -> None:
        """Everything running on `machine` dies (a host losing power)."""
        for pid in self.pids(machine):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.pids(machine) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in self.procs:
            if p.poll() is None and not self._alive_in(p.pid):
                p.wait(timeout=5)

    def _alive_in(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        for ns in self._made:
            for pid in (int(p) for p in subprocess.run(
                    ["ip", "netns", "pids", ns], capture_output=True, text=True,
                    timeout=10).stdout.split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self._made.clear()
        for folder in self._etc:
            (folder / "hosts").unlink(missing_ok=True)
            try:
                folder.rmdir()
            except OSError:
                pass
        self._etc.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
