"""Revocation (issue 22, item 3): re-issuing a node with `sparsat certs` puts its old token
(by SHA-256) and certificate (by serial) on a CA-signed list, DIR/ca/revoked, which the ground
station hands to every node in its RegisterReply; a real trainer then refuses the old
ground-station credentials, in plain TLS and with --mtls."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from sparsat.node.wire import rpc, security
from sparsat.node.wire.security import (
    Credentials,
    CredentialsError,
    Revocations,
    load_revocations,
    parse_revocations,
    sign_revocations,
    token_digest,
)
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.sim.cli import main
from sparsat.sim.deploy import certs

sys.path.insert(0, str(Path(__file__).parent))
from security_cluster import ground_station_and_trainer, load_dataset  # noqa: E402

NODES = ["--node", "ground_station:ground-station", "--node", "trainer:trainer-1",
         "--node", "operator:operator"]
SCENARIO = {"name": "revoke", "seed": 0,
            "dataset": {"name": "fashion_mnist", "train_subset": 40, "test_subset": 40},
            "sensors": {"count": 2, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5}},
            "training": {"strategy": "ist", "workers": 2, "hidden": [16, 16]}}


def _certs(*args: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["certs", *args]) == 0


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A deployment whose ground station was re-issued; (DIR, a copy of the old folder)."""
    out = tmp_path_factory.mktemp("deployment")
    _certs(str(out), *NODES)
    old = tmp_path_factory.mktemp("old") / "ground-station"
    shutil.copytree(out / "ground-station", old)
    _certs(str(out), "--node", "ground_station:ground-station")
    return out, old


@dataclass
class Cluster:
    trainer: str
    mutual: bool


@pytest.fixture(scope="module", params=[False, True], ids=["tls", "mtls"])
def cluster(request: pytest.FixtureRequest, rotated: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The real ground station with its NEW credentials and a real trainer-1 registered with
    it; the trainer's own folder holds the list of before the rotation (it learns the new
    one from its RegisterReply)."""
    out, _ = rotated
    mutual = bool(request.param)
    tmp = tmp_path_factory.mktemp("mtls" if mutual else "tls")
    with ground_station_and_trainer(tmp, SCENARIO, out, mutual) as (gs, trainer):
        yield Cluster(trainer, mutual)


@pytest.mark.slow
def test_a_revoked_ground_station_is_refused_by_a_trainer(
        cluster: Cluster, rotated: tuple[Path, Path]) -> None:
    out, old = rotated
    # the trainer's own file does not know the old token: the RegisterReply told it
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    old_token = (old / "token").read_text().strip()
    assert token_digest(old_token) not in load_revocations(out / "trainer-1" / "revoked",
                                                           ca).tokens
    err = load_dataset(cluster.trainer, Credentials.from_dir(old, cluster.mutual))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    assert "credentials revoked" in (err.details() or "")
    # the new credentials pass the Guard (the empty upload is then refused by the servicer)
    new = load_dataset(cluster.trainer, Credentials.from_dir(out / "ground-station",
                                                              cluster.mutual))
    assert new.code() not in (grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.PERMISSION_DENIED), new.details()
    if cluster.mutual:  # the old certificate with the new token: its serial is revoked
        fresh = Credentials.from_dir(out / "ground-station", True)
        mixed = Credentials(fresh.ca_pem, (old / "node.crt").read_bytes(),
                            (old / "node.key").read_bytes(), fresh.token, True)
        err = load_dataset(cluster.trainer, mixed)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
        assert "client certificate was re-issued" in (err.details() or "")


# ---- the list itself --------------------------------------------------------------------


def test_certs_revokes_what_it_reissues(rotated: tuple[Path, Path]) -> None:
    out, old = rotated
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    held = load_revocations(out / "ca" / "revoked", ca)
    old_cert = x509.load_pem_x509_certificate((old / "node.crt").read_bytes())
    assert held.tokens == {token_digest((old / "token").read_text().strip())}
    assert held.serials == {format(old_cert.serial_number, "x")}
    # copied into the re-issued folder and the operator's, not the trainer's (not made)
    for who in ("ground-station", "operator"):
        assert (out / who / "revoked").read_text() == (out / "ca" / "revoked").read_text()
    assert (out / "trainer-1" / "revoked").read_text() != (out / "ca" / "revoked").read_text()
    assert Credentials.from_dir(out / "ground-station").revocations is not None


def test_a_list_of_another_ca_or_garbled_is_refused(rotated: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    out, _ = rotated
    other = tmp_path / "other"
    _certs(str(other), "--node", "trainer:trainer-1")
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    with pytest.raises(CredentialsError, match="not signed by this deployment's CA"):
        parse_revocations((other / "ca" / "revoked").read_text(), ca)
    # at start: exit 2 naming the file, with --certs and with --revoked
    node = tmp_path / "trainer-1"
    shutil.copytree(out / "trainer-1", node)
    shutil.copy(other / "ca" / "revoked", node / "revoked")
    for flags in (["--certs", str(node)],
                  ["--tls-ca", str(node / "ca.crt"), "--tls-cert", str(node / "node.crt"),
                   "--tls-key", str(node / "node.key"), "--token", str(node / "token"),
                   "--revoked", str(node / "revoked")]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["node", "trainer", "--listen", "127.0.0.1:1", "--ground-station",
                         "127.0.0.1:2", "--register-wait", "1", *flags])
        assert code == 2
        assert str(node / "revoked") in err.getvalue()
    (node / "revoked").write_text("sparsat-revoked1.garbled.x")
    with pytest.raises(CredentialsError, match=str(node / "revoked")):
        Credentials.from_dir(node)


def test_an_older_list_does_not_replace_a_newer_one(rotated: tuple[Path, Path]) -> None:
    out, _ = rotated
    ca_key, ca_cert = certs.load_or_make_ca(out)
    newer = sign_revocations(ca_key, ca_cert, {"a" * 64}, set(), issued_at=200.0)
    older = sign_revocations(ca_key, ca_cert, set(), set(), issued_at=100.0)
    held = Revocations(ca_cert, parse_revocations(newer.signed, ca_cert))
    assert not held.adopt(older.signed.encode())
    assert held.current is not None and held.current.issued_at == 200.0
    assert held.token_revoked("x") is False
    later = sign_revocations(ca_key, ca_cert, {"b" * 64}, set(), issued_at=300.0)
    assert held.adopt(later.signed.encode())
    assert held.current is not None and held.current.tokens == {"b" * 64}


class _Aborted(Exception):
    pass


class _FakeContext:
    def __init__(self, token: str) -> None:
        self._md = [("authorization", f"Bearer {token}")]
        self.code: Any = None
        self.details = ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._md

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted(details)


def test_the_guard_refuses_a_revoked_token(rotated: tuple[Path, Path]) -> None:
    out, old = rotated
    trainer = Credentials.from_dir(out / "trainer-1")  # the list of before the rotation
    old_token = (old / "token").read_text().strip()
    method = "/sparsat.v1.Trainer/LoadDataset"
    ok = rpc._authenticate(method, _FakeContext(old_token), trainer)  # type: ignore[arg-type]
    assert ok is not None and ok.name == security.GROUND_STATION
    assert trainer.revocations is not None
    assert trainer.revocations.adopt((out / "ca" / "revoked").read_bytes())
    ctx = _FakeContext(old_token)
    with pytest.raises(_Aborted):
        rpc._authenticate(method, ctx, trainer)  # type: ignore[arg-type]
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED and "credentials revoked" in ctx.details
    new_token = (out / "ground-station" / "token").read_text().strip()
    assert rpc._authenticate(method, _FakeContext(new_token), trainer) is not None  # type: ignore[arg-type]


def test_register_reply_carries_the_list(rotated: tuple[Path, Path]) -> None:
    from sparsat.node.wire import control

    out, _ = rotated
    signed = (out / "ca" / "revoked").read_bytes().strip()
    with_list = control.register_answer("{}", "i", None, signed).SerializeToString()
    without = control.register_answer("{}", "i", None).SerializeToString()
    assert control.reply_revoked(pb.RegisterReply.FromString(with_list)) == signed
    print(f"revocation list with 1 token, 1 serial: {len(with_list) - len(without)} bytes")
