"""Helpers for `make gpu-check` and `make gpu-pretrain`: the CUDA gate, the summary, the verdict.

    .venv/bin/python bench/gpu_check.py require cuda   (or require-cuda)
        exits 1 with one line on stderr when torch sees no CUDA device; `require cpu`
        (GPU_DEVICE=cpu: the same steps on the CPU, as tests/test_bench_smoke.py runs them)
        only says so.
    .venv/bin/python bench/gpu_check.py summary runs/gpu-check
        reads encoder.json and ist.json there (each bench's last stdout line) and prints the
        figures the README quotes: visible-token images/s at r = 0, 0.5, 0.75 and the IST
        round wall time, for the device the benches ran on; exits 1 naming what is missing
        when a bench's figures are not all there.
    .venv/bin/python bench/gpu_check.py adopt --new NEW.json --baseline OLD.json \
            --checkpoint DIR/encoder.pt
        the adoption rule for a longer pretraining run: its `bench/probe.py --pooling mean`
        validation accuracy at r = 0.5 (the probe's epoch chosen on a validation split of
        training images, never on the test set) beats the shipped checkpoint's from the same
        probe settings, and the
        checkpoint is at most 8 MiB (the cap tests/test_encoders.py checks). Exits 0 to adopt,
        1 not to, and prints why either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CAP_BYTES = 8 * 1024 * 1024  # the shipped-checkpoint cap (tests/test_encoders.py)
RATIOS = ("0.0", "0.5", "0.75")


def require(device: str) -> int:
    if device == "cpu":
        print("the GPU check's steps on the CPU (GPU_DEVICE=cpu): no CUDA needed")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: CUDA is not available here (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and a CUDA build of torch",
              file=sys.stderr)
        return 1
    print(f"CUDA device: {torch.cuda.get_device_name(0)} (torch {torch.__version__})")
    return 0


def _json_line(path: Path) -> dict[str, Any]:
    """The last line of a bench's output that parses as a JSON object."""
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict):
                return found
    raise SystemExit(f"{path}: no JSON line")


def _figure(found: dict[str, Any], key: str, where: Path) -> Any:
    """found[key]; a bench that left it out (or wrote null) stops the summary, exit 1."""
    if found.get(key) is None:
        raise SystemExit(f"{where}: no {key}")
    return found[key]


def summary(folder: Path) -> int:
    path = folder / "encoder.json"
    enc = _json_line(path)
    devices = _figure(enc, "devices", path)
    print(f"encoder bench ({enc.get('cuda_device', ', '.join(devices))}, batch "
          f"{enc.get('batch')}):")
    for device in devices:
        names = sorted({k.rsplit(f"_{device}_", 1)[0] for k in enc if f"_{device}_" in k})
        if not names:
            raise SystemExit(f"{path}: no figures on {device}")
        for name in names:
            tag = f"{name}_{device}"
            full = _figure(enc, f"{tag}_full_images_per_s", path)
            rates = "  ".join(f"r={r}: {_figure(enc, f'{tag}_r{r}_visible_images_per_s', path)}"
                              for r in RATIOS)
            print(f"  {tag:28s} visible-token img/s  {rates}  (full image {full}; "
                  f"r=0.75 / r=0 x{_figure(enc, f'{tag}_r0.75_over_r0', path)})")
    path = folder / "ist.json"
    ist = _json_line(path)
    print(f"IST bench ({ist.get('cuda_device', ist.get('device'))}, trainers on "
          f"{_figure(ist, 'device', path)}, L = {_figure(ist, 'local_steps', path)}):")
    runs = {k: v for k, v in ist.items() if isinstance(v, dict)}
    if not runs:
        raise SystemExit(f"{path}: no configuration's figures")
    for key, res in runs.items():
        wall = _figure(res, "round_wall_s", path)
        print(f"  {key:32s} round {wall} s wall, "
              f"{_figure(res, 'round_bytes', path) / 1e6:.3f} MB; epoch "
              f"{_figure(res, 'epoch_wall_s', path)} s")
    print(f"JSON lines in {folder}/encoder.json and {folder}/ist.json")
    return 0


def adopt(new: Path, baseline: Path, checkpoint: Path) -> int:
    key = "mean_r0.5_validation_accuracy"  # chosen and compared on validation, not test
    a, b = _json_line(new).get(key), _json_line(baseline).get(key)
    if a is None or b is None:
        print(f"no {key} in {new if a is None else baseline} (run bench/probe.py "
              "--pooling mean --ratios 0.5)")
        return 1
    size = checkpoint.stat().st_size
    rises, fits = a > b, size <= CAP_BYTES
    verdict = "ADOPT" if rises and fits else "KEEP the shipped checkpoint"
    print(f"probe r=0.5 (mean pooling, validation): new {a:.4f} vs shipped {b:.4f} "
          f"({'rises' if rises else 'does not rise'}); checkpoint {size:,} B "
          f"({'within' if fits else 'over'} the {CAP_BYTES:,} B cap) -> {verdict}")
    return 0 if rises and fits else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("require-cuda")
    r = sub.add_parser("require")
    r.add_argument("device", choices=["cpu", "cuda"])
    s = sub.add_parser("summary")
    s.add_argument("folder", type=Path)
    a = sub.add_parser("adopt")
    a.add_argument("--new", type=Path, required=True, help="probe output of the new checkpoint")
    a.add_argument("--baseline", type=Path, required=True,
                   help="probe output of the shipped checkpoint, same probe settings")
    a.add_argument("--checkpoint", type=Path, required=True, help="the new encoder.pt")
    args = p.parse_args(argv)
    if args.cmd in ("require", "require-cuda"):
        return require(getattr(args, "device", "cuda"))
    if args.cmd == "summary":
        return summary(args.folder)
    return adopt(args.new, args.baseline, args.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
