"""A node notices a ground-station restart and registers again by itself.

The ground station keeps its registry in its store, but a node's address may have changed
and a registration made while it was down was lost; so sensor hosts and trainers watch it:
every CHECK_EVERY_S a Health.Check (with a deadline); when its instance (random per process)
is not the one the node registered with, or it answers again after being unreachable, the
node registers again (same id, same address). The instance registered with comes from the
Register reply itself, so a restart at any moment after registration is seen, also one inside
the first period, before any check (a ground station too old to say is learnt from the first
check instead). One thread, one call per period: never a busy loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from sparsat.node.wire import security
from sparsat.node.wire.control import health_request
from sparsat.node.wire.rpc import Refused, Registered, Unreachable, channel
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

CHECK_EVERY_S = 2.0
CHECK_DEADLINE_S = 2.0
REGISTER_AGAIN_S = 10.0  # one re-registration's wait; the next check tries again

log = logging.getLogger("sparsat.rejoin")


class Rejoin(threading.Thread):
    """Watches the ground station at `ground_station` for node `node_id`, which registered
    with its process `instance` (Registered.instance); `register(wait_s)` registers again and
    returns the reply (raising Unreachable or Refused when it cannot)."""

    def __init__(self, node_id: str, ground_station: str,
                 register: Callable[[float], Registered], instance: str,
                 every_s: float = CHECK_EVERY_S) -> None:
        super().__init__(daemon=True, name=f"rejoin-{node_id[:32]}")
        self.node_id, self.ground_station = node_id, ground_station
        self._register = register
        self.every_s = every_s
        self.instance = instance  # the ground station's process the node is registered with
        self.rejoined = 0  # registrations again (tests, logs)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        ch = channel(self.ground_station, peer=security.GROUND_STATION)
        health = pb_grpc.HealthStub(ch)
        lost = False  # the last check got no answer
        try:
            while not self._stop.wait(self.every_s):
                try:
                    reply = health.Check(health_request(),
                                         timeout=min(CHECK_DEADLINE_S, self.every_s))
                except grpc.RpcError as e:
                    if not lost:
                        log.warning("%s: ground station %s not answering (%s); will register "
                                    "again when it is back", self.node_id, self.ground_station,
                                    e.code().name)
                    lost = True
                    # a fresh channel for the next check: this one waits out gRPC's reconnect
                    # backoff (1 s growing 1.6x to 120 s), so a ground station back after a
                    # long outage would be seen only at its next reconnect attempt
                    ch.close()
                    ch = channel(self.ground_station, peer=security.GROUND_STATION)
                    health = pb_grpc.HealthStub(ch)
                    continue
                changed = bool(self.instance) and reply.instance != self.instance
                if changed or lost:
                    why = "restarted" if changed else "back"
                    if not self._rejoin(why, reply.instance):
                        continue  # the next check tries again
                elif not self.instance:  # registered with a ground station that did not say
                    self.instance = reply.instance
                lost = False
        finally:
            ch.close()

    def _rejoin(self, why: str, seen: str) -> bool:
        try:
            registered = self._register(REGISTER_AGAIN_S)
        except (Unreachable, Refused) as e:
            log.warning("%s: registering again failed: %s", self.node_id, e)
            return False
        # the process that took this registration: it may already be another than the one
        # the check saw (restarted again in between), and the next check compares with it
        self.instance = registered.instance or seen
        self.rejoined += 1
        log.info("%s: ground station %s %s; registered again", self.node_id,
                 self.ground_station, why)
        return True
