"""The on-board cloud detector in the mission's books: its parameters' uplink, and its
measured token errors (sparsat.node.data.detector, fitted by
sparsat.sim.scenario.configs.detector_fit).

The parameters reach a satellite's host in its sensor config at registration; they are
counted as uplinked once to every satellite (DETECTOR_BYTES each, in bytes.uplink_breakdown
`detector` and each satellite's `uplink:SAT` link) before the mission. Their air time (40
bits) is not put on the mission clock.
"""

from __future__ import annotations

from typing import Any

from sparsat.node.data.detector import DETECTOR_BYTES
from sparsat.sim.mission.tally import Tally
from sparsat.sim.scenario.configs import detector_fit
from sparsat.sim.scenario.schema import Scenario


def charge(s: Scenario, tally: Tally) -> None:
    """Count the detector's uplink to every satellite (nothing for the oracle)."""
    if s.sensors.mask.detector == "oracle":
        return
    for sat in s.sensors.ids():
        tally.book_uplink(sat, {"detector": DETECTOR_BYTES})


def results(s: Scenario, stats: Any) -> dict[str, Any] | None:
    """results.json `detector`: the rule, its bytes and on-board FLOPs an image, its fit, and
    its token error rates on the test split (StatsReply) against the true cloud field.
    None without clouds."""
    if s.sensors.mask.kind != "clouds":
        return None
    usable, cloudy = int(stats.detector_usable_tokens), int(stats.detector_cloudy_tokens)
    fp, fn = int(stats.detector_false_positives), int(stats.detector_false_negatives)
    out: dict[str, Any] = {
        "kind": s.sensors.mask.detector, "params": None, "bytes": 0, "fit": None,
        "tokens": usable + cloudy, "truly_usable": usable, "truly_cloudy": cloudy,
        "false_positives": fp, "false_negatives": fn,
        # called cloudy / truly usable; called clear / truly cloudy
        "false_positive_rate": fp / usable if usable else None,
        "false_negative_rate": fn / cloudy if cloudy else None,
        "flops_per_image": 0}
    fit = detector_fit(s)
    if fit is not None:
        d = fit.detector
        out.update({
            "params": {"level": d.level, "share16": d.share16, "min_mean": d.min_mean,
                       "max_std": d.max_std, "hex": d.to_hex()},
            "bytes": DETECTOR_BYTES * s.sensors.count,
            "fit": {"images": fit.images, "tokens": fit.tokens,
                    "false_positives": fit.false_positives,
                    "false_negatives": fit.false_negatives, "wall_s": round(fit.wall_s, 3)},
            "flops_per_image": fit.flops_per_image})
    return out
