"""`sparsat certs`: a deployment's certificate authority and every node's credentials.

    DIR/ca/ca.key, ca.crt          the CA (keep ca.key off the nodes)
    DIR/NODE/ca.crt, node.crt, node.key, token
                                   one folder per node: copy it to the node's machine and
                                   start the node with --certs DIR/NODE

Run again on the same DIR to add nodes: the CA is reused, existing node folders are replaced
(a new key and token). Node names are those the local launcher uses for the scenario
(ground-station, trainer-K, sensors-H, operator) unless given with --node.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sparsat.node.wire.security import (
    GROUND_STATION,
    ROLE_NAMES,
    CredentialsError,
    Identity,
    check_name,
)
from sparsat.node.wire.security import sign_token as _sign
from sparsat.sim.scenario.schema import Scenario, load

OPERATOR = "operator"


@dataclass(frozen=True)
class NodeSpec:
    name: str
    role: str
    satellites: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()  # extra DNS names / IP addresses for the certificate


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_or_make_ca(out: Path, days: int = 365, name: str = "sparsat deployment CA"
                    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = out / "ca" / "ca.key", out / "ca" / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CredentialsError(f"{key_path} is not an EC key")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _san(name: str, hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def issue(out: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
          node: NodeSpec, days: int = 365) -> Path:
    """Write DIR/NODE/{ca.crt,node.crt,node.key,token}; returns the folder."""
    check_name(node.name)
    if node.role not in ROLE_NAMES:
        raise CredentialsError(f"role must be one of {', '.join(ROLE_NAMES)}, got {node.role!r}")
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node.name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                        node.role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(node.name, node.hosts), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder = out / node.name
    _write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / "node.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / "node.key", _pem_key(key), private=True)
    token = _sign(ca_key, ca_cert, Identity(node.name, node.role, node.satellites))
    _write(folder / "token", (token + "\n").encode(), private=True)
    return folder


def scenario_nodes(scenario: Scenario, trainers: int | None = None) -> list[NodeSpec]:
    """The nodes the local launcher starts for `scenario`, with its names, and an operator."""
    sats = scenario.sensors.ids()
    per = scenario.sensors.per_process
    k = trainers if trainers is not None else scenario.training.num_workers
    nodes = [NodeSpec(GROUND_STATION, "ground_station")]
    nodes += [NodeSpec(f"trainer-{i}", "trainer") for i in range(k)]
    nodes += [NodeSpec(f"sensors-{h}", "sensor", tuple(sats[s : s + per]))
              for h, s in enumerate(range(0, len(sats), per))]
    nodes.append(NodeSpec(OPERATOR, "operator"))
    return nodes


def parse_node(text: str) -> NodeSpec:
    """ROLE:NAME[:SAT,SAT...] (sensor hosts list their satellites)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise ValueError(f"--node takes ROLE:NAME[:SAT,SAT...], got {text!r}")
    role = parts[0].replace("-", "_")
    sats = tuple(s for s in parts[2].split(",") if s) if len(parts) == 3 else ()
    if role == "sensor" and not sats:
        raise ValueError(f"--node {text}: a sensor host lists its satellites (sensor:NAME:SAT,...)")
    if role != "sensor" and sats:
        raise ValueError(f"--node {text}: only sensor hosts have satellites")
    return NodeSpec(parts[1], role, sats)


def make_deployment(out: Path, nodes: list[NodeSpec], hosts: dict[str, tuple[str, ...]],
                    days: int = 365) -> list[Path]:
    """The CA (made once) and a folder per node; `hosts`: extra certificate names per node
    ("*" for every node)."""
    unknown = sorted(set(hosts) - {n.name for n in nodes} - {"*"})
    if unknown:
        raise ValueError(f"--san names nodes that are not being made: {unknown}")
    names = [n.name for n in nodes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"node names given twice: {twice}")
    ca_key, ca_cert = load_or_make_ca(out, days)
    return [issue(out, ca_key, ca_cert, NodeSpec(
        n.name, n.role, n.satellites, n.hosts + hosts.get("*", ()) + hosts.get(n.name, ())),
        days) for n in nodes]


def cmd_certs(args: argparse.Namespace) -> int:
    """`sparsat certs DIR`: the CA and the credentials of the nodes named by --scenario
    and --node, with --san's extra names; prints where each went."""
    nodes = scenario_nodes(load(args.scenario), args.trainers) if args.scenario else []
    nodes += [parse_node(n) for n in args.node or []]
    if not nodes:
        raise ValueError("give --scenario FILE and/or --node ROLE:NAME[:SATS]")
    hosts: dict[str, tuple[str, ...]] = {}
    for item in args.san or []:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--san takes NODE=HOST[,HOST...] (NODE may be *), got {item!r}")
        hosts[name] = hosts.get(name, ()) + tuple(v for v in values.split(",") if v)
    out = Path(args.out)
    folders = make_deployment(out, nodes, hosts, args.days)
    for node, folder in zip(nodes, folders, strict=True):
        extra = f" satellites {','.join(node.satellites)}" if node.satellites else ""
        print(f"{node.role:14} {node.name:20} {folder}{extra}")
    print(f"CA in {out / 'ca'} (keep ca.key off the nodes); start each node with "
          f"--certs {out}/NODE")
    return 0
