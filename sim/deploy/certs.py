"""`sparsat certs`: a deployment's certificate authority and every node's credentials.

    DIR/ca/ca.key, ca.crt          the CA (keep ca.key off the nodes)
    DIR/NODE/ca.crt, node.crt, node.key, token
                                   one folder per node: copy it to the node's machine and
                                   start the node with --certs DIR/NODE

    DIR/ca/issued.json             every node name issued from this CA: its role, its --san names,
                                   its current token's digest and certificate's serial
    DIR/ca/revoked                 the revocation list, signed with the CA key: the tokens
                                   (SHA-256 of the token) and certificate serials re-issuing
                                   a node took back; copied as DIR/NODE/revoked into every
                                   folder made in the call and the operator's

Run again on the same DIR to add nodes: the CA is reused, existing node folders are replaced
(a new key and token; the old token and certificate go on the revocation list). Node names
are those the local launcher uses for the scenario (ground-station, trainer-K, sensors-H,
operator) unless given with --node.

Clients check a server's certificate by name alone (gRPC Python shows them no more), so a
name must mean one role: `ground-station` and `operator` are issued only with their roles,
a name issued before keeps its role (re-issuing it with that role rotates its credentials),
and no certificate carries another node's name as a --san (check_names).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sparsat.node.wire.security import (
    GROUND_STATION,
    OPERATOR,
    RESERVED_NAMES,
    REVOKED_FILE,
    ROLE_NAMES,
    AuthError,
    CredentialsError,
    Identity,
    TokenVerifier,
    cert_names,
    cert_serial,
    check_name,
    check_private_file,
    load_revocations,
    public_key_text,
    reserved_refusal,
    sign_revocations,
    token_digest,
)
from sparsat.node.wire.security import sign_token as _sign
from sparsat.sim.scenario.schema import Scenario, load

ISSUED = "issued.json"  # beside the CA: {"nodes": {NAME: {"role": ROLE, "sans": [...],
#                                                          "token": SHA256, "serial": HEX}}}


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
        check_private_file(key_path)
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
    """Write DIR/NODE/{ca.crt,node.crt,node.key,token}; returns the folder. Checks the name
    and role alone: make_deployment (`sparsat certs`) checks them against the other nodes."""
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
    token = _sign(ca_key, ca_cert, Identity(node.name, node.role, node.satellites,
                                            key=public_key_text(key)))
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


@dataclass(frozen=True)
class Issued:
    """A name issued from a CA: its role and the --san names its certificate carries."""

    role: str
    sans: tuple[str, ...] = ()
    token: str = ""  # its current token's digest (token_digest), "" when not recorded
    serial: str = ""  # its current certificate's serial (cert_serial)


def _credential_ids(folder: Path) -> tuple[str, str]:
    """The token digest and certificate serial of the credentials in a node folder, "" for
    what it lacks or cannot be read."""
    digest = serial = ""
    try:
        digest = token_digest((folder / "token").read_text().strip())
    except (OSError, UnicodeDecodeError):
        pass
    try:
        serial = cert_serial(x509.load_pem_x509_certificate((folder / "node.crt").read_bytes()))
    except (OSError, ValueError):
        pass
    return digest, serial


def load_issued(out: Path, ca_cert: x509.Certificate) -> dict[str, Issued]:
    """The names issued from the CA in `out`: its record, else (a CA folder made before
    the record) the node folders beside it whose tokens the CA signed."""
    path = out / "ca" / ISSUED
    if path.exists():
        try:
            nodes = json.loads(path.read_text())["nodes"]
            return {str(k): Issued(str(v["role"]), tuple(str(h) for h in v["sans"]),
                                   str(v.get("token", "")), str(v.get("serial", "")))
                    for k, v in nodes.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CredentialsError(f"{path} is unreadable ({e}); it records the names this "
                                   "CA issued: restore it, or remove it to rebuild it from "
                                   "the node folders") from e
    verifier, record = TokenVerifier(ca_cert), dict[str, Issued]()
    for token in sorted(out.glob("*/token")):
        try:
            who = verifier.verify(token.read_text().strip())
            cert = x509.load_pem_x509_certificate((token.parent / "node.crt").read_bytes())
        except (OSError, ValueError, AuthError):
            continue
        record[who.name] = Issued(who.role, tuple(h for h in cert_names(cert) if h != who.name),
                                  *_credential_ids(token.parent))
    return record


def check_names(nodes: list[NodeSpec], issued: dict[str, Issued]) -> None:
    """ValueError naming the node and why, for anything that would let one node's
    certificate pass for another node (clients check names only): a reserved name with
    another role, a name issued before with another role, a --san that is a reserved name
    or another node's name, a name another node carries as a --san. `nodes` carry their
    final --san names."""
    for n in nodes:
        refusal = reserved_refusal(n.name, n.role)
        if refusal:
            raise ValueError(f"node {n.name}: {refusal} (it is issued only as --node "
                             f"{RESERVED_NAMES[n.name]}:{n.name})")
        old = issued.get(n.name)
        if old is not None and old.role != n.role:
            raise ValueError(f"node {n.name}: already issued from this CA as a {old.role} "
                             f"(ca/{ISSUED}); re-issue it as a {old.role} or pick another name")
    # who holds each name a certificate carries: its node, and the nodes with it as a --san
    mine = {n.name for n in nodes}
    holders: dict[str, set[str]] = {}
    for name, entry in issued.items():
        if name not in mine:  # the re-issued ones carry their new --san names
            for h in (name, *entry.sans):
                holders.setdefault(h, set()).add(name)
    for n in nodes:
        for h in [n.name, *n.hosts]:
            holders.setdefault(h, set()).add(n.name)
    for n in nodes:
        for h in n.hosts:
            if h == n.name:
                continue
            refusal = reserved_refusal(h, n.role)
            if refusal:
                raise ValueError(f"node {n.name}: --san {h}: {refusal}")
            if h in mine or h in issued:
                raise ValueError(f"node {n.name}: --san {h} is another node's name; a "
                                 "certificate carries only its own node's")
        others = sorted(holders.get(n.name, set()) - {n.name})
        if others:
            raise ValueError(f"node {n.name}: node {others[0]} carries this name as a --san; "
                             "pick another name")


def make_deployment(out: Path, nodes: list[NodeSpec], hosts: dict[str, tuple[str, ...]],
                    days: int = 365) -> list[Path]:
    """The CA (made once) and a folder per node; `hosts`: extra certificate names per node
    ("*" for every node). Refuses (ValueError, naming the node) what check_names refuses,
    and records the names it issues beside the CA before issuing them."""
    unknown = sorted(set(hosts) - {n.name for n in nodes} - {"*"})
    if unknown:
        raise ValueError(f"--san names nodes that are not being made: {unknown}")
    names = [n.name for n in nodes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"node names given twice: {twice}")
    for n in nodes:
        check_name(n.name)
    nodes = [NodeSpec(n.name, n.role, n.satellites,
                      n.hosts + hosts.get("*", ()) + hosts.get(n.name, ())) for n in nodes]
    check_names(nodes, {})  # before a CA is made for nothing
    ca_key, ca_cert = load_or_make_ca(out, days)
    issued = load_issued(out, ca_cert)
    check_names(nodes, issued)
    # rotation: what a re-issued name held before goes on the revocation list first
    revoked_path = out / "ca" / REVOKED_FILE
    held = load_revocations(revoked_path, ca_cert) if revoked_path.exists() else None
    tokens = set(held.tokens) if held else set()
    serials = set(held.serials) if held else set()
    for n in nodes:
        old = issued.get(n.name)
        if old is not None:  # the same role: check_names refused any other
            for digest, serial in ((old.token, old.serial), _credential_ids(out / n.name)):
                tokens.update([digest] if digest else [])
                serials.update([serial] if serial else [])
    revocations = sign_revocations(ca_key, ca_cert, tokens, serials)
    _write(revoked_path, (revocations.signed + "\n").encode())
    for n in nodes:
        issued[n.name] = Issued(n.role, tuple(dict.fromkeys(n.hosts)))
    _record(out, issued)
    folders = [issue(out, ca_key, ca_cert, n, days) for n in nodes]
    for n, folder in zip(nodes, folders, strict=True):
        issued[n.name] = Issued(n.role, issued[n.name].sans, *_credential_ids(folder))
    _record(out, issued)
    for folder in {*folders, out / OPERATOR} if (out / OPERATOR).is_dir() else folders:
        _write(folder / REVOKED_FILE, (revocations.signed + "\n").encode())
    return folders


def _record(out: Path, issued: dict[str, Issued]) -> None:
    record = {k: {"role": v.role, "sans": list(v.sans), "token": v.token, "serial": v.serial}
              for k, v in sorted(issued.items())}
    _write(out / "ca" / ISSUED, (json.dumps({"nodes": record}, indent=1) + "\n").encode())


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
