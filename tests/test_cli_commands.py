"""`sparsat`'s commands and options, pinned; the node commands parse the same in the CLI and
in a node the launcher starts (sparsat.sim.deploy.nodes, without the CLI); `sparsat --help`
imports no heavy library."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sparsat.sim import cli
from sparsat.sim.deploy import launcher, nodes

SECURITY = ["--certs", "--insecure", "--mtls", "--revoked", "--tls-ca", "--tls-cert",
            "--tls-key", "--token"]
COMMANDS = {
    "": ["--log-level"],
    "run": sorted(["--device", "--ground-station", "--out", "--quiet", "--resume",
                   "--token-cache", "scenario", *SECURITY]),
    "pretrain": ["--batch-size", "--data-root", "--dataset", "--decoder-depth", "--decoder-dim",
                 "--device", "--encoder", "--epochs", "--init", "--lr", "--mask-ratio", "--out",
                 "--seed", "--stop-after", "--threads", "--warmup-epochs"],
    "contacts": ["--hours", "--out", "--stations-out", "--step", "--tle-out", "scenario"],
    "clouds": ["--n", "--out", "--preset", "--roughness", "--scenario", "--seed", "--size"],
    "sweep": ["--address", "--collect", "--dry-run", "--executor", "--jobs", "--no-token-cache",
              "--out", "--quiet", "--shard", "sweep"],
    "certs": ["--days", "--node", "--san", "--scenario", "--trainers", "out"],
    "ground-station": sorted(["--checkpoint-dir", "--listen", "--port-file", "--resume",
                              "--scenario", "--store", "--token-cache", *SECURITY]),
    "node": [],
    "node sensor": sorted(["--advertise", "--ground-station", "--id", "--listen", "--node-id",
                           "--register-wait", "--token-cache", *SECURITY]),
    "node trainer": sorted(["--advertise", "--device", "--ground-station", "--id", "--listen",
                            "--register-wait", "--threads", *SECURITY]),
}
NODE_COMMANDS = ["ground-station", "node sensor", "node trainer"]


def _commands(p: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its command line, "" the top one."""
    found = {prefix: p}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix} {name}".strip()))
    return found


def _options(p: argparse.ArgumentParser) -> list[str]:
    return sorted(s for a in p._actions
                  if not isinstance(a, argparse._SubParsersAction | argparse._HelpAction)
                  for s in a.option_strings or [a.dest])


def test_commands_and_their_options_are_pinned() -> None:
    commands = _commands(cli.parser())

    assert {name: _options(p) for name, p in commands.items()} == COMMANDS


def test_a_node_parses_its_command_as_the_cli_does() -> None:
    """The launcher's child parses with nodes.parser(): the same commands, the same help."""
    ours, theirs = _commands(cli.parser()), _commands(nodes.parser())

    assert sorted(theirs) == sorted(["", "node", *NODE_COMMANDS])
    for name in NODE_COMMANDS:
        assert theirs[name].format_help() == ours[name].format_help()


def test_the_cli_imports_no_heavy_library() -> None:
    code = ("import sys, sparsat.sim.cli as c; c.parser(); "
            "print(sorted(m for m in ('torch', 'grpc', 'numpy', 'pydantic', 'cryptography') "
            "if m in sys.modules))")

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout

    assert out.strip() == "[]"


def test_an_exec_launched_node_runs_the_node_commands_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSAT_LAUNCH", "exec")  # a fresh interpreter, not the fork server
    log = tmp_path / "node.log"

    proc = launcher.start_node("probe", ["node", "trainer", "--help"], log)

    assert isinstance(proc, subprocess.Popen)
    assert proc.args[1:3] == ["-m", "sparsat.sim.deploy.nodes"]  # type: ignore[index]
    assert proc.wait(timeout=60) == 0
    assert log.read_text().startswith("usage: sparsat node trainer")
