"""Per-call credentials (sparsat.node.wire.security.sign_call, CallChecker): what a callee is
sent works for it alone, for one method, once, within the clock-skew tolerance; their bytes as
the radio link charges them. The replays against real processes are in
tests/test_security_replay.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sparsat.node.wire import security
from sparsat.node.wire.security import (
    CALL_VALUE_CHARS,
    CLOCK_AHEAD_S,
    CLOCK_BEHIND_S,
    MAX_AGE_S,
    AuthError,
    CallChecker,
    CallsExhausted,
    Credentials,
    StaleCall,
    sign_call,
)
from sparsat.sim.cli import main

METHOD = "/sparsat.v1.Mission/Stats"
GS = "ground-station"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deployment")
    assert main(["certs", str(out), "--node", "ground_station:ground-station",
                 "--node", "operator:operator", "--node", "sensor:sensors-0:sat-0,sat-1",
                 "--node", "trainer:trainer-1"]) == 0
    return out


def _creds(deployment: Path, name: str) -> tuple[Credentials, ec.EllipticCurvePrivateKey]:
    c = Credentials.from_dir(deployment / name)
    key = serialization.load_pem_private_key(c.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return c, key


def _sign(deployment: Path, name: str, clock: Clock, audience: str = GS,
          method: str = METHOD, dt_s: float = 0.0) -> tuple[str, Credentials]:
    c, key = _creds(deployment, name)
    assert c.verifier is not None
    return sign_call(key, c.token, c.verifier.deployment, audience, method,
                     int((clock.t + dt_s) * 1000)), c


def _checker(deployment: Path, clock: Clock, **kw: int) -> CallChecker:
    """A ground station's checker, started 100 s before `clock`."""
    c = Credentials.from_dir(deployment / GS)
    assert c.verifier is not None
    started = Clock(clock.t - 100)  # the server started 100 s ago
    checker = CallChecker(GS, c.verifier.deployment, clock=started, **kw)
    checker._clock = clock  # type: ignore[attr-defined]
    return checker


def test_a_credential_is_for_one_callee_one_method_once(deployment: Path) -> None:
    clock = Clock()
    checker = _checker(deployment, clock)
    value, op = _sign(deployment, "operator", clock)
    assert len(value) == CALL_VALUE_CHARS
    checker.check(value, op.token, op.identity, METHOD)
    with pytest.raises(AuthError, match="used before"):
        checker.check(value, op.token, op.identity, METHOD)
    for audience, method in (("trainer-1", METHOD), (GS, "/sparsat.v1.Registry/ListNodes")):
        other, _ = _sign(deployment, "operator", clock, audience, method)
        with pytest.raises(AuthError, match="not operator's for ground-station"):
            checker.check(other, op.token, op.identity, METHOD)
    assert len(checker) == 1  # refused ones are not remembered


def test_a_credential_goes_with_its_token_and_key(deployment: Path) -> None:
    """Signed by another node's key (a stolen token, the thief's key), or presented with
    another token than the one it signed: refused."""
    clock = Clock()
    checker = _checker(deployment, clock)
    op, _ = _creds(deployment, "operator")
    thief, _ = _sign(deployment, "sensors-0", clock)  # sensors-0's key, for GS and Stats
    with pytest.raises(AuthError, match="not operator's"):
        checker.check(thief, op.token, op.identity, METHOD)
    value, sensor = _sign(deployment, "sensors-0", clock)
    with pytest.raises(AuthError, match="not operator's"):
        checker.check(value, op.token, op.identity, METHOD)
    checker.check(value, sensor.token, sensor.identity, METHOD)


def test_the_clock_skew_tolerance(deployment: Path) -> None:
    clock = Clock()
    checker = _checker(deployment, clock)
    for dt, ok in ((CLOCK_AHEAD_S - 1, True), (CLOCK_AHEAD_S + 1, False),
                   (-(CLOCK_BEHIND_S + MAX_AGE_S) + 1, True),
                   (-(CLOCK_BEHIND_S + MAX_AGE_S) - 1, False)):
        value, op = _sign(deployment, "operator", clock, dt_s=dt)
        if ok:
            checker.check(value, op.token, op.identity, METHOD)
        else:
            with pytest.raises(AuthError, match="ahead of|old"):
                checker.check(value, op.token, op.identity, METHOD)


def test_a_credential_from_before_the_server_started_is_stale(deployment: Path) -> None:
    """A restarted server has forgotten its nonces: it refuses what was made before it
    started (StaleCall: UNAVAILABLE, so an honest caller retries), so what it accepts it has
    seen since."""
    clock = Clock()
    c = Credentials.from_dir(deployment / GS)
    assert c.verifier is not None
    checker = CallChecker(GS, c.verifier.deployment, clock=clock)  # starts now
    value, op = _sign(deployment, "operator", clock, dt_s=-1)
    with pytest.raises(StaleCall, match="before this server started"):
        checker.check(value, op.token, op.identity, METHOD)
    fresh, _ = _sign(deployment, "operator", clock)
    checker.check(fresh, op.token, op.identity, METHOD)


def test_nonces_are_bounded_per_caller_and_expire(deployment: Path) -> None:
    clock = Clock()
    checker = _checker(deployment, clock, max_per_caller=3)
    for _ in range(3):
        value, op = _sign(deployment, "operator", clock)
        checker.check(value, op.token, op.identity, METHOD)
    value, op = _sign(deployment, "operator", clock)
    with pytest.raises(CallsExhausted, match="operator made more than 3 calls"):
        checker.check(value, op.token, op.identity, METHOD)
    for _ in range(3):  # another caller still has its whole share: nobody crowds it out
        value, sensor = _sign(deployment, "sensors-0", clock)
        checker.check(value, sensor.token, sensor.identity, METHOD)
    # once their credentials are too old to be accepted anyway, their nonces are let go
    old, op = _sign(deployment, "operator", clock)
    clock.t += CLOCK_BEHIND_S + MAX_AGE_S + 1
    value, _ = _sign(deployment, "operator", clock)
    checker.check(value, op.token, op.identity, METHOD)
    assert len(checker) == 1
    with pytest.raises(AuthError, match="old"):  # the forgotten nonce's credential
        checker.check(old, op.token, op.identity, METHOD)
    clock.t -= 3600  # the wall clock steps back an hour: the checker's clock does not
    with pytest.raises(AuthError, match="old"):
        checker.check(old, op.token, op.identity, METHOD)
    assert len(checker) == 1


def test_a_replay_racing_its_original_is_accepted_once(deployment: Path) -> None:
    """The same credential from 8 threads at once, 20 times over: one of each accepted."""
    clock = Clock()
    checker = _checker(deployment, clock)
    for _ in range(20):
        value, op = _sign(deployment, "operator", clock)
        accepted: list[bool] = []
        start = threading.Barrier(8)

        def call(value: str = value, op: Credentials = op, start: threading.Barrier = start,
                 accepted: list[bool] = accepted) -> None:
            start.wait()
            try:
                checker.check(value, op.token, op.identity, METHOD)
                accepted.append(True)
            except AuthError:
                accepted.append(False)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(accepted) == [False] * 7 + [True]


@pytest.mark.parametrize("mangle", [
    lambda v: "", lambda v: "x.y.z", lambda v: "0" + v, lambda v: v + "A",
    lambda v: v.replace(".", ".AA", 1), lambda v: v.rsplit(".", 1)[0] + ".!!!",
    lambda v: "9" * 17 + v[13:], lambda v: v + "." + v, lambda v: v + "=", lambda v: " " + v,
    lambda v: v + " ", lambda v: v.replace("-", "+").replace("_", "/") if "-" in v or "_" in v
    else "+" + v[1:], lambda v: "\u00b2" + v[1:],
], ids=["empty", "garbage", "leading zero", "long signature", "long nonce", "not base64",
        "huge time", "four parts", "padding", "leading space", "trailing space",
        "standard alphabet", "superscript digit"])
def test_malformed_credentials_are_refused(deployment: Path, mangle: object) -> None:
    clock = Clock()
    checker = _checker(deployment, clock)
    value, op = _sign(deployment, "operator", clock)
    with pytest.raises(AuthError):
        checker.check(mangle(value), op.token, op.identity, METHOD)  # type: ignore[operator]
    assert len(checker) == 0


def test_credential_bytes_as_the_radio_link_charges_them(deployment: Path) -> None:
    """Header names and values: `authorization: Bearer TOKEN` and `sparsat-call: VALUE`."""
    clock = Clock()
    value, sensor = _sign(deployment, "sensors-0", clock, method="/sparsat.v1.Downlink/Send")
    headers = [("authorization", f"Bearer {sensor.token}"), (security.CALL_HEADER, value)]
    assert security.credential_bytes(sensor.token) == sum(len(k) + len(v) for k, v in headers)
    assert CALL_VALUE_CHARS == 123


def test_a_credential_made_from_the_docs_alone_is_accepted(deployment: Path) -> None:
    """docs/protocol.md "Call credential", followed with nothing of sparsat's but the files
    of a node's folder: the deployment id from ca.crt, the message's seven lines, the raw
    r||s, base64url without padding."""
    import base64
    import hashlib
    import os
    import time

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    folder = deployment / "operator"
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    deployment_id = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
    token = (folder / "token").read_text().strip()
    key = serialization.load_pem_private_key((folder / "node.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    t = str(int(time.time() * 1000))
    nonce = b64(os.urandom(16))
    message = "\n".join(["sparsat-call1", deployment_id, GS, METHOD, t, nonce,
                         hashlib.sha256(token.encode()).hexdigest()]).encode()
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    value = f"{t}.{nonce}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    assert len(value) == 123

    op = Credentials.from_dir(folder)
    checker = CallChecker(GS, deployment_id, clock=lambda: int(t) / 1000 + 1)
    checker.started_ms = int(t) - 1000
    checker.check(value, token, op.identity, METHOD)
