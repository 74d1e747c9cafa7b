"""Names that cannot impersonate, and secrets only their owner reads (issue 22, items 2 and 4):
`sparsat certs` refuses what would let one node's certificate pass for another's, and real
`sparsat ground-station` / `sparsat node trainer` processes on 127.0.0.1 refuse what is
forged past it, in plain TLS and with --mtls."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from sparsat.node.wire import rpc
from sparsat.node.wire.security import Credentials
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.cli import main
from sparsat.sim.deploy import certs

sys.path.insert(0, str(Path(__file__).parent))
from security_cluster import ground_station_and_trainer, load_dataset  # noqa: E402

from sparsat.sim.deploy.certs import NodeSpec

pytestmark = pytest.mark.slow

NODES = ["--node", "ground_station:ground-station", "--node", "trainer:trainer-0",
         "--node", "trainer:trainer-1", "--node", "operator:operator"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deployment")
    assert main(["certs", str(out), *NODES]) == 0
    return out


@pytest.fixture(scope="module")
def forged(deployment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer-role certificate and token named ground-station, signed by the deployment's
    CA by calling issue() directly: what `sparsat certs` no longer makes."""
    ca_key, ca_cert = certs.load_or_make_ca(deployment)
    out = tmp_path_factory.mktemp("forged")
    return certs.issue(out, ca_key, ca_cert, NodeSpec("ground-station", "trainer"))


def _raw(folder: Path, token_of: Path | None = None) -> Credentials:
    """A folder's credentials as an attacker uses them: not checked (from_dir would refuse
    a forged one), optionally with another folder's token."""
    token = ((token_of or folder) / "token").read_text().strip()
    return Credentials((folder / "ca.crt").read_bytes(), (folder / "node.crt").read_bytes(),
                       (folder / "node.key").read_bytes(), token)


@dataclass
class Cluster:
    gs: str  # the ground station's address
    trainer: str  # trainer-1's, registered with it
    mutual: bool


SCENARIO = {"name": "names", "seed": 0,
            "dataset": {"name": "fashion_mnist", "train_subset": 40, "test_subset": 40},
            "sensors": {"count": 2, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5}},
            "training": {"strategy": "ist", "workers": 2, "hidden": [16, 16]}}


@pytest.fixture(scope="module", params=[False, True], ids=["tls", "mtls"])
def cluster(request: pytest.FixtureRequest, deployment: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real ground station and a real trainer-1 registered with it (--mtls or not)."""
    mutual = bool(request.param)
    tmp = tmp_path_factory.mktemp("mtls" if mutual else "tls")
    with ground_station_and_trainer(tmp, SCENARIO, deployment, mutual) as (gs, trainer):
        yield Cluster(gs, trainer, mutual)


# ---- sparsat certs --------------------------------------------------------------------------


def _certs(out: Path, *args: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["certs", str(out), *args])
    return code, err.getvalue()


@pytest.mark.parametrize(("args", "said"), [
    # attack (a): a trainer named ground-station, in a call after the deployment was made
    (["--node", "trainer:ground-station"],
     "node ground-station: the name 'ground-station' is reserved for the ground_station role, "
     "not a trainer's"),
    (["--node", "sensor:operator:sat-0"], "node operator: the name 'operator' is reserved"),
    # attack (b): the reserved name as another node's SAN, for one node or for every node
    (["--node", "trainer:trainer-0", "--san", "trainer-0=ground-station"],
     "node trainer-0: --san ground-station: the name 'ground-station' is reserved"),
    (["--node", "trainer:trainer-5", "--san", "*=ground-station"],
     "node trainer-5: --san ground-station: the name 'ground-station' is reserved"),
    (["--node", "trainer:trainer-5", "--san", "trainer-5=operator"],
     "node trainer-5: --san operator: the name 'operator' is reserved"),
    # another node's name: issued before, or in the same call
    (["--node", "trainer:trainer-5", "--san", "trainer-5=trainer-1"],
     "node trainer-5: --san trainer-1 is another node's name"),
    (["--node", "trainer:a", "--node", "trainer:b", "--san", "a=b"],
     "node a: --san b is another node's name"),
    # a name issued with another role
    (["--node", "sensor:trainer-0:sat-0"],
     "node trainer-0: already issued from this CA as a trainer"),
], ids=["trainer-named-gs", "sensor-named-operator", "san-gs", "san-star-gs", "san-operator",
        "san-issued-node", "san-node-same-call", "name-other-role"])
def test_certs_refuses_a_name_that_would_impersonate(tmp_path: Path, args: list[str],
                                                     said: str) -> None:
    assert _certs(tmp_path, *NODES)[0] == 0
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    code, err = _certs(tmp_path, *args)

    assert code == 2 and said in err, err
    assert err.count("\n") == 1  # one line
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before  # nothing issued, nothing recorded


def test_certs_records_names_and_allows_rotation(tmp_path: Path) -> None:
    assert _certs(tmp_path, *NODES, "--san", "*=127.0.0.1")[0] == 0
    record = json.loads((tmp_path / "ca" / "issued.json").read_text())["nodes"]
    assert {k: record["trainer-0"][k] for k in ("role", "sans")} == {
        "role": "trainer", "sans": ["127.0.0.1"]}
    assert set(record["trainer-0"]) == {"role", "sans", "token", "serial"}  # revocation ids
    assert record["ground-station"]["role"] == "ground_station"
    old = (tmp_path / "trainer-0" / "token").read_text()

    # the same name with the same role: rotation, a new key and token
    assert _certs(tmp_path, "--node", "trainer:trainer-0")[0] == 0
    assert (tmp_path / "trainer-0" / "token").read_text() != old
    assert _certs(tmp_path, "--node", "ground_station:ground-station", "--san",
                  "*=ground-station")[0] == 0  # its own name, redundant: fine
    # a CA folder made before the record: the record is rebuilt from the node folders
    (tmp_path / "ca" / "issued.json").unlink()
    code, err = _certs(tmp_path, "--node", "sensor:trainer-1:sat-0")
    assert code == 2 and "node trainer-1: already issued from this CA as a trainer" in err
    code, err = _certs(tmp_path, "--node", "trainer:x", "--san", "x=trainer-1")
    assert code == 2 and "another node's name" in err


# ---- servers check roles, not only names ----------------------------------------------------


def test_a_trainer_certificate_named_ground_station_cannot_register(
        cluster: Cluster, forged: Path) -> None:
    """Attack (c): PERMISSION_DENIED at the real ground station, TLS and mTLS."""
    impostor = _raw(forged)
    impostor = Credentials(impostor.ca_pem, impostor.cert_pem, impostor.key_pem,
                           impostor.token, cluster.mutual)
    ch = rpc.channel(cluster.gs, peer="ground-station", creds=impostor)
    try:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
                node_id="ground-station", role=pb.TRAINER, address="127.0.0.1:1"), timeout=10)
    finally:
        ch.close()
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'ground-station' is reserved for the ground_station role" in (e.value.details()
                                                                          or "")


def test_a_node_refuses_to_start_with_a_forged_reserved_name(forged: Path,
                                                             tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "sparsat.sim.cli", "node", "trainer",
                          "--listen", "127.0.0.1:0", "--device", "cpu", "--certs", str(forged)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "'ground-station' is reserved for the ground_station role" in run.stderr


@pytest.mark.parametrize("cluster", [True], ids=["mtls"], indirect=True)
def test_mtls_a_certificate_goes_only_with_its_own_nodes_token(
        cluster: Cluster, deployment: Path, forged: Path) -> None:
    """Attack (d), with --mtls: a client certificate with another node's token is
    UNAUTHENTICATED; the trainer-role certificate named ground-station, carrying the ground
    station's own token (as a trainer that got it would replay it), included."""
    gs_token = _raw(forged, token_of=deployment / "ground-station")
    replay = Credentials(gs_token.ca_pem, gs_token.cert_pem, gs_token.key_pem, gs_token.token,
                         True)
    err = load_dataset(cluster.trainer, replay)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the certificate is a trainer's, the token ground-station (ground_station)'s" in (
        err.details() or "")

    # one node's certificate with another's token, at the ground station
    mixed = _raw(deployment / "trainer-0", token_of=deployment / "trainer-1")
    ch = rpc.channel(cluster.gs, peer="ground-station", creds=mixed)
    try:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
                node_id="trainer-1", role=pb.TRAINER, address="127.0.0.1:1"), timeout=10)
    finally:
        ch.close()
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "does not belong to trainer-1" in (e.value.details() or "")


# ---- secrets only their owner reads -------------------------------------------------------


def test_a_node_refuses_a_key_or_token_others_can_read(deployment: Path,
                                                       tmp_path: Path) -> None:
    folder = tmp_path / "trainer-0"
    shutil.copytree(deployment / "trainer-0", folder)
    cmd = [sys.executable, "-m", "sparsat.sim.cli", "node", "trainer", "--listen",
           "127.0.0.1:0", "--device", "cpu", "--certs", str(folder)]
    for name, mode in (("node.key", 0o644), ("token", 0o640), ("node.key", 0o602)):
        (folder / "node.key").chmod(0o600)
        (folder / "token").chmod(0o600)
        (folder / name).chmod(mode)

        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)

        assert run.returncode == 2, run.stderr
        assert (f"error: {folder / name} is readable or writable by others (mode {mode:04o})"
                in run.stderr), run.stderr
        assert f"chmod 600 {folder / name}" in run.stderr


def test_the_operator_refuses_a_token_others_can_read(deployment: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    folder = tmp_path / "operator"
    shutil.copytree(deployment / "operator", folder)
    (folder / "token").chmod(0o644)

    code = main(["run", "scenarios/quickstart.yaml", "--ground-station", "127.0.0.1:1",
                 "--certs", str(folder), "--out", str(tmp_path / "out")])

    assert code == 2
    assert f"chmod 600 {folder / 'token'}" in capsys.readouterr().err
