"""Mission control's downlink process in-process, with a stand-in sensor: link loss and
on-board encoding on the periodic-pass clock."""

from __future__ import annotations

from typing import Any

import pytest
from tqdm import tqdm

from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.sim.mission.control import MissionControl
from sparsat.sim.mission.satellite import Passes, fixed_rate
from sparsat.sim.scenario.schema import Scenario
from sparsat.sim.space.links import Link, PeriodicPasses


class OneBatch:
    """A sensor that sends one batch of 10 samples (1,000 bytes, 60 bytes of acks)."""

    def __init__(self, encode_flops: int = 0) -> None:
        self.encode_flops = encode_flops

    def Transmit(self, request: pb.TransmitRequest, **_: Any) -> pb.TransmitReport:
        return pb.TransmitReport(satellite_id=request.satellite_id, batch_bytes=[1000], sent=10,
                                 acked=10, ack_bytes=[60], remaining=0,
                                 encode_flops=self.encode_flops, encode_s=0.01)


def _fly(links: dict[str, Any], sensor: OneBatch, **sensors: Any) -> tuple[MissionControl, Link]:
    scenario = Scenario.model_validate({"name": "clock", "links": links,
                                        "passes": {"period_s": 100, "duration_s": 50},
                                        "sensors": {"count": 1, **sensors}})
    mc = MissionControl(scenario, "127.0.0.1:1", show_progress=False)  # never dialled here
    down = scenario.links.downlink
    link = Link(mc.env, "downlink:sat-0", down.rate_bps, down.latency_s)
    bar = tqdm(disable=True)
    mc.use_sensors({"sat-0": pb.NodeInfo(node_id="host-0")}, {"host-0": sensor})
    mc.env.run(until=mc.env.process(mc.downlink.fly(
        "sat-0", Passes(PeriodicPasses(100, 50, 0)), fixed_rate(link), link, bar)))
    mc.gs_channel.close()
    return mc, link


@pytest.mark.parametrize("loss", [0.0, 0.3])
def test_downlink_loss_takes_effect_without_orbits(loss: float) -> None:
    links = {"downlink": {"rate_bps": 8000, "loss": loss, **({"frame_bytes": 64} if loss else {})}}
    mc, link = _fly(links, OneBatch())
    resent = mc.tally.retransmitted_bytes
    assert (resent > 0) == (loss > 0)
    assert link.bytes == 1060 + resent  # every resent frame is on the air and charged
    assert mc.env.now == pytest.approx((1060 + resent) * 8 / 8000)


def test_a_sample_leaves_only_once_the_satellite_has_encoded_it() -> None:
    links = {"downlink": {"rate_bps": 8000}}
    mc, _ = _fly(links, OneBatch(encode_flops=3 * 10**12), payload={"kind": "cls"},
                 onboard_flops=1.0e12)
    onboard = mc.tally.compute["onboard_encoder"]
    assert onboard == {"flops": 3 * 10**12, "sim_s": 3.0, "wall_s": 0.01}
    assert mc.env.now == pytest.approx(3.0 + 1060 * 8 / 8000)  # 3 s encoding, then the link
