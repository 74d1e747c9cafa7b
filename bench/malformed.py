"""Malformed-input benchmark: a real ground-station process, fed hostile downlink batches.

Run from the repo root: .venv/bin/python bench/malformed.py [--smoke] [--mib 60] [--streams 8]
Starts `sparsat ground-station` (plaintext, Fashion-MNIST, one satellite) as its own process,
registers a sensor host and sends, one case after the other:
1. a valid batch (the baseline);
2. a valid batch with one sample whose run code says 2**35 - 1 tokens, one of 2**26 (each
   refused alone, INVALID_ARGUMENT; the others stored);
3. a batch of 70,000 ids; --mib MiB of 1-byte packed ids; --mib MiB of empty patches; a
   batch whose per-sample shapes say 2**32 - 1 (each ends its stream, INVALID_ARGUMENT);
4. --streams concurrent streams of one caller, each a --mib MiB batch (one sample whose
   pixels do not match its code), held open together.
After each case it reads the process's peak RSS (Mission.Stats peak_rss_bytes, and VmHWM
from /proc) and checks it still answers. --smoke: 2 MiB messages, 2 streams, seconds.
Ends with one JSON line of its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml

from sparsat.node.wire import downlink, rpc
from sparsat.node.wire.codec import varint
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

SAT = "sat-0"
SCENARIO = {"name": "malformed", "dataset": {"train_subset": 64, "test_subset": 64},
            "sensors": {"count": 1}, "training": {"strategy": "centralized", "workers": 1,
                                                  "hidden": [8, 8]}}


def _hwm(pid: int) -> int:
    """VmHWM of process `pid`, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _valid_payloads(scenario_path: Path) -> list[downlink.Payload]:
    """Seven samples sat-0 really holds, as a sensor host builds them."""
    from sparsat.node.data.datasets import load_dataset
    from sparsat.node.data.masking import capture, copy_id
    from sparsat.node.data.sharding import assign, sample_id
    from sparsat.node.models import encoders
    from sparsat.node.wire.codec import encode_patches
    from sparsat.sim.scenario.configs import sensor_config
    from sparsat.sim.scenario.schema import load

    cfg = sensor_config(load(scenario_path))
    data = load_dataset(cfg.dataset, "train")
    grid = encoders.config(cfg.encoder).grid
    held = assign(len(data), cfg.train_subset, cfg.train_indices_seed, cfg.satellites)[SAT]
    out = []
    for i in [int(k) for k in held[:7]]:
        sid = copy_id(sample_id(cfg.dataset.name, "train", i), None)
        cap = capture(cfg.mask, data.image(i), grid, sid)
        out.append(downlink.patch_payload(i, data.label(i),
                                       encode_patches(cap.image, grid, cap.visible), False))
    return out


def _batch(payloads: list[downlink.Payload], first: bool = True) -> bytes:
    b = downlink.BatchBuilder(SAT if first else "")
    for p in payloads:
        b.add(p)
    return b.to_pb().SerializeToString()


def _unary(address: str, method: str, raw: bytes) -> tuple[str, list[pb.BatchAck], str]:
    """One unary call of raw bytes; its status as _send gives it (no acks)."""
    ident = lambda b: b  # noqa: E731
    ch = rpc.channel(address)
    try:
        ch.unary_unary(method, ident, ident)(raw, timeout=120)
        return "OK", [], ""
    except grpc.RpcError as e:
        return e.code().name, [], (e.details() or "")[:160]
    finally:
        ch.close()


def _send(address: str, raws: list[bytes], hold: threading.Event | None = None,
          ch: grpc.Channel | None = None) -> tuple[str, list[pb.BatchAck], str]:
    """One Send stream of `raws` (raw bytes, as any client could write them), on `ch` or a
    channel of its own; when `hold` is given the stream stays open, after its messages,
    until it is set."""
    ident = lambda b: b  # noqa: E731

    def stream() -> Iterator[bytes]:
        yield from raws
        if hold is not None:
            hold.wait(60)

    own = ch is None
    use = rpc.channel(address) if ch is None else ch
    acks: list[pb.BatchAck] = []
    try:
        for raw in use.stream_stream("/sparsat.v1.Downlink/Send", ident, ident)(
                stream(), timeout=120):
            acks.append(pb.BatchAck.FromString(raw))
        return "OK", acks, ""
    except grpc.RpcError as e:
        return e.code().name, acks, (e.details() or "")[:160]
    finally:
        if own:
            use.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2 MiB messages, 2 streams")
    ap.add_argument("--mib", type=int, default=60, help="size of the big messages, MiB")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams of one caller")
    args = ap.parse_args(argv)
    mib, streams = (2, 2) if args.smoke else (args.mib, args.streams)
    big = mib << 20
    with tempfile.TemporaryDirectory(prefix="sparsat-malformed-") as tmp:
        scenario = Path(tmp) / "s.yaml"
        scenario.write_text(yaml.safe_dump(SCENARIO))
        port_file = Path(tmp) / "port"
        env = dict(os.environ)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparsat.sim.cli", "ground-station", "--scenario", str(scenario),
             "--listen", "127.0.0.1:0", "--store", str(Path(tmp) / "store"),
             "--port-file", str(port_file), "--insecure"], env=env, stdout=subprocess.DEVNULL,
            stderr=open(Path(tmp) / "gs.log", "w"))  # noqa: SIM115
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the ground station did not start: "
                                       + (Path(tmp) / "gs.log").read_text()[-2000:])
                time.sleep(0.2)
            return _run(port_file.read_text(), proc.pid, scenario, big, streams, args.smoke)
        finally:
            proc.terminate()
            proc.wait(30)


def _run(address: str, pid: int, scenario: Path, big: int, streams: int, smoke: bool
         ) -> dict[str, Any]:
    ch = rpc.channel(address)
    pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
        node_id="sensors-0", role=pb.SENSOR, address="127.0.0.1:1", satellite_ids=[SAT]),
        timeout=30)
    mission, health = pb_grpc.MissionStub(ch), pb_grpc.HealthStub(ch)
    good = _valid_payloads(scenario)
    cases: list[dict[str, Any]] = []
    refused_all = True

    def record(name: str, want: str, outcome: tuple[str, list[pb.BatchAck], str],
               stored: int = 0) -> None:
        nonlocal refused_all
        code, acks, details = outcome
        ok = code == want and (not stored or sum(a.stored for a in acks) == stored)
        refused_all &= ok
        stats = mission.Stats(pb.StatsRequest(), timeout=30)
        cases.append({"case": name, "code": code, "stored": sum(a.stored for a in acks),
                      "refused": sum(len(a.rejected) for a in acks), "details": details,
                      "peak_rss_mib": round(stats.peak_rss_bytes / 2**20, 1),
                      "vmhwm_mib": round(_hwm(pid) / 2**20, 1), "as_expected": ok})

    record("a valid batch (baseline)", "OK", _send(address, [_batch(good[:1])]), stored=1)
    for k, run in enumerate((2**35 - 1, 2**26)):
        fresh = good[1 + 3 * k : 4 + 3 * k]  # samples not stored yet
        bad = downlink.Payload(fresh[0].id, fresh[0].label, b"\x00" + varint(run) + b"\x00" * 16,
                            runs=True)
        record(f"a sample whose run says {run} tokens, beside 2 valid ones", "OK",
               _send(address, [_batch([bad] + fresh[1:])]), stored=2)
    record("70,000 ids", "INVALID_ARGUMENT", _send(address, [pb.DownlinkBatch(
        satellite_id=SAT, ids=[1] * 70_000, labels=[0] * 70_000).SerializeToString()]))
    head = b"\x0a" + varint(len(SAT)) + SAT.encode()
    record(f"{big >> 20} MiB of 1-byte ids", "INVALID_ARGUMENT", _send(
        address, [head + b"\x12" + varint(big) + b"\x01" * big]))
    record(f"{big >> 20} MiB of empty patches", "INVALID_ARGUMENT", _send(
        address, [head + b"\x22\x00" * (big // 2)]))
    record(f"{big >> 20} MiB of rle", "INVALID_ARGUMENT", _send(address, [pb.DownlinkBatch(
        satellite_id=SAT, ids=[1], labels=[0], patches=[b"\x01"],
        rle=b"\xff" * big).SerializeToString()]))
    record(f"a {big >> 20} MiB Register of empty satellite names", "INVALID_ARGUMENT",
           _unary(address, "/sparsat.v1.Registry/Register", b"\x22\x00" * (big // 2)))
    record("shapes of 2**32 - 1", "OK", _send(address, [pb.DownlinkBatch(
        satellite_id=SAT, ids=[1], labels=[0], patches=[b"\x01" * 8],
        shapes=[2**32 - 1] * 3).SerializeToString()]))
    # one caller (one connection: without credentials a caller is a connection; with them,
    # its identity), many streams, each holding one max-size message in flight
    hold, caller = threading.Event(), rpc.channel(address)
    one = pb.DownlinkBatch(satellite_id=SAT, ids=[good[0].id], labels=[good[0].label],
                           patches=[b"\x00" * big]).SerializeToString()
    results: list[tuple[str, list[pb.BatchAck], str]] = []
    threads = [threading.Thread(target=lambda: results.append(_send(address, [one], hold, caller)))
               for _ in range(streams)]
    for t in threads:
        t.start()
    time.sleep(8.0 if not smoke else 1.0)  # every stream opened (a loaded machine is slow)
    hold.set()
    for t in threads:
        t.join(120)
    caller.close()
    codes = sorted(r[0] for r in results)
    stats = mission.Stats(pb.StatsRequest(), timeout=30)
    cases.append({"case": f"{streams} streams of one caller, {big >> 20} MiB each",
                  "codes": codes, "peak_rss_mib": round(stats.peak_rss_bytes / 2**20, 1),
                  "vmhwm_mib": round(_hwm(pid) / 2**20, 1)})
    answering = health.Check(pb.HealthRequest(), timeout=10).ready
    ch.close()
    res = {"smoke": smoke, "message_mib": big >> 20, "streams": streams, "cases": cases,
           "refused_all": refused_all, "answering_after": answering}
    for c in cases:
        print(f"{c['case']:60s} {c.get('code', c.get('codes'))!s:28s} "
              f"peak RSS {c['peak_rss_mib']:8.1f} MiB")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
