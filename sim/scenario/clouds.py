"""`sparsat clouds`: a picture of example cloud masks, from a scenario's cloud climatology or
a preset (sparsat.node.data.clouds draws them; docs/clouds.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_clouds(args: argparse.Namespace) -> int:
    from dataclasses import replace

    args.size = args.size or [28, 256]
    from sparsat.node.data.clouds import PRESETS, example_figure
    from sparsat.sim.scenario.schema import load

    if args.scenario:
        scenario = load(args.scenario)
        if scenario.sensors.mask.kind != "clouds":
            raise ValueError(f"{args.scenario}: sensors.mask.kind is "
                             f"{scenario.sensors.mask.kind}, not clouds")
        spec = scenario.sensors.mask.cloud_spec()
    else:
        spec = PRESETS[args.preset]
    if args.roughness is not None:
        spec = replace(spec, roughness=args.roughness)
    if args.n < 1 or any(s < 2 for s in args.size):
        raise ValueError("--n must be >= 1 and every --size >= 2")
    example_figure(Path(args.out), spec, n=args.n, sizes=tuple(args.size), seed=args.seed)
    print(f"{args.n} example scenes ({spec.cover_mean:.2f} mean cover, {spec.clear_share:.2f} "
          f"clear, {spec.overcast_share:.2f} overcast, roughness {spec.roughness}) in {args.out}")
    return 0
