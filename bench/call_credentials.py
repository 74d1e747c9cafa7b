"""Per-call credentials: what they cost a call in CPU, and on the radio link.

Run from the repo root: .venv/bin/python bench/call_credentials.py [--calls 5000] [--smoke]
Makes a throw-away deployment for scenarios/quickstart.yaml (`sparsat certs`), then:
1. the header bytes each node's calls carry (`authorization` and `sparsat-call`, names and
   values: sparsat.node.wire.security.credential_bytes), which a sensor host's Send streams
   put on the simulated downlink;
2. the time to make one call's credential (sign_call: ECDSA P-256) and to check it
   (CallChecker.check: signature, time, nonce), mean over --calls, on this CPU.
Ends with one JSON line of its figures. --smoke: 50 calls.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sparsat.bench import parse_args
from sparsat.node.wire.security import CallChecker, Credentials, credential_bytes, sign_call
from sparsat.sim.cli import main as sparsat

ROOT = Path(__file__).resolve().parents[1]
SEND = "/sparsat.v1.Downlink/Send"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    args = parse_args(parser, argv, {"calls": 50})
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            assert sparsat(["certs", tmp, "--scenario",
                            str(ROOT / "scenarios" / "quickstart.yaml")]) == 0
        nodes = {p.name: Credentials.from_dir(p) for p in sorted(Path(tmp).iterdir())
                 if (p / "token").exists()}
    figures: dict[str, Any] = {"calls": args.calls, "credential_bytes": {
        name: credential_bytes(c.token) for name, c in nodes.items()}}
    for name, n in figures["credential_bytes"].items():
        print(f"{name:16s} {n:5d} B of call credentials per call (token "
              f"{len(nodes[name].token)} characters)")
    sensor = next(c for name, c in nodes.items() if name.startswith("sensors"))
    key = serialization.load_pem_private_key(sensor.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and sensor.verifier is not None
    t0 = time.perf_counter()
    values = [sign_call(key, sensor.token, sensor.verifier.deployment, "ground-station", SEND)
              for _ in range(args.calls)]
    sign_s = (time.perf_counter() - t0) / args.calls
    checker = CallChecker("ground-station", sensor.verifier.deployment)
    checker.started_ms -= 60_000  # the calls above were made before it
    t0 = time.perf_counter()
    for value in values:
        checker.check(value, sensor.token, sensor.identity, SEND)
    check_s = (time.perf_counter() - t0) / args.calls
    figures.update(sign_us=round(sign_s * 1e6, 1), check_us=round(check_s * 1e6, 1),
                   nonces_held=len(checker))
    print(f"sign_call {figures['sign_us']} us, CallChecker.check {figures['check_us']} us "
          f"per call (mean of {args.calls})")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
