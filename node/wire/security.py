"""Transport security and node identity for every sparsat gRPC server and channel.

A deployment has one certificate authority (`sparsat certs` makes it, sim/deploy/certs.py). Every
node holds, in its credentials folder:

- `ca.crt`: the deployment's CA certificate, the trust anchor for TLS and for tokens;
- `node.crt`, `node.key`: its own certificate (DNS name = its node name), used as the server
  certificate of the node's gRPC server and, with mutual TLS, as its client certificate;
- `token`: its identity, `sparsat2.<payload>.<signature>`, where the payload names the node,
  its role (sensor, trainer, ground_station, operator), its public key (node.key's) and, for a
  sensor host, the satellites it may speak for; the signature is the CA key's (ECDSA P-256,
  raw r||s), so any node can check any token with `ca.crt` alone and no node needs the CA key.

Channels are TLS, checking the server's certificate against the CA and against the name of the
node they mean to reach (not the address they dial: nodes move between addresses, names stay),
and every call carries the caller's token (`authorization: Bearer ...`, only ever over TLS) and
a credential for that call alone (`sparsat-call`: sign_call, CallChecker below), signed with
the key the token names, for the callee's name, the method, a time and a nonce: a token alone
authorises nothing, and what a callee receives is of no use anywhere else, or again.
Servers check both on every call: none, a forged or a replayed one is UNAUTHENTICATED, a role
the method does not admit is PERMISSION_DENIED (ROLES below), and servicers see the verified
caller through `sparsat.node.wire.rpc.caller(context)` for finer checks (a sensor host sends
only as its satellites). With mutual TLS (`mutual=True`), a client must also present a
certificate of the deployment whose name, role (its OU) and key equal its token's.

Clients see no more of a server's certificate than its name, so names are roles by
construction: `ground-station` and `operator` (RESERVED_NAMES) belong to their roles alone.
`sparsat certs` issues them to nothing else and no certificate carries another node's name,
a node refuses credentials that break this, and servers refuse a token that does
(PERMISSION_DENIED). A key or token file others may read is refused (check_private_file).

Revocation: `sparsat certs` signs a list of the tokens (token_digest: SHA-256 of the token
string) and certificate serials that re-issuing took back (RevocationList, DIR/ca/revoked and
DIR/NODE/revoked); a node holds one (Revocations, from its folder or --revoked), adopts a newer
one from its RegisterReply, and its servers refuse what it names (UNAUTHENTICATED).

Security is configured once per process (`configure`); the CLI requires credentials or an
explicit `--insecure` (plaintext, no authentication: for a trusted network or a laptop).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

TOKEN_PREFIX = "sparsat2"  # sparsat1: before tokens named their node's key (refused)
OLD_TOKEN_PREFIXES = ("sparsat1",)
SIGNATURE_BYTES = 64  # tokens and calls are signed ECDSA P-256 / SHA-256, raw r||s (JWS ES256)
ROLE_NAMES = ("sensor", "trainer", "ground_station", "operator")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
GROUND_STATION = "ground-station"  # the ground station's node name, as clients expect it
OPERATOR = "operator"  # mission control's node name
# Names clients dial by (channel(peer=...)): issued only with their role, never as another
# node's name or SAN (sparsat certs), and refused by every server with any other role.
RESERVED_NAMES = {GROUND_STATION: "ground_station", OPERATOR: "operator"}
CREDENTIAL_FILES = ("ca.crt", "node.crt", "node.key", "token")
REVOKED_FILE = "revoked"  # DIR/NODE/revoked, DIR/ca/revoked: the signed revocation list
REVOKED_PREFIX = "sparsat-revoked1"

# Who may call what: full method name -> roles admitted; None: anyone (no token needed).
# A method missing here is refused to everyone.
_ANY = frozenset(ROLE_NAMES)
ROLES: dict[str, frozenset[str] | None] = {
    "/sparsat.v1.Downlink/Send": frozenset({"sensor"}),
    "/sparsat.v1.Registry/Register": frozenset({"sensor", "trainer"}),
    "/sparsat.v1.Registry/ListNodes": frozenset({"operator"}),
    "/sparsat.v1.Health/Check": _ANY,
    "/sparsat.v1.Sensor/Transmit": frozenset({"operator"}),
    "/sparsat.v1.Trainer/LoadDataset": frozenset({"ground_station"}),
    "/sparsat.v1.Trainer/Train": frozenset({"ground_station"}),
    "/grpc.health.v1.Health/Check": None,  # orchestrators and grpc_health_probe
    "/grpc.health.v1.Health/Watch": None,
    "/grpc.health.v1.Health/List": None,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": None,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": None,
}
MISSION_PREFIX = "/sparsat.v1.Mission/"  # every Mission call: the operator only


def roles_for(method: str) -> frozenset[str] | None | bool:
    """The roles admitted to `method`, None when it is open, False when it is unknown."""
    if method in ROLES:
        return ROLES[method]
    if method.startswith(MISSION_PREFIX):
        return frozenset({"operator"})
    return False


def reserved_refusal(name: str, role: str) -> str | None:
    """Why `name` may not be a `role`'s (a name reserved for another role), else None."""
    owner = RESERVED_NAMES.get(name)
    if owner is not None and owner != role:
        return f"the name {name!r} is reserved for the {owner} role, not a {role}'s"
    return None


def cert_role(cert: x509.Certificate) -> str:
    """The role `sparsat certs` wrote into a certificate (its OU), "" when it has none."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(values[0].value) if values else ""


class AuthError(Exception):
    """A token or certificate that does not prove who the caller is."""


def bearer_token(values: list[str]) -> str:
    """The token in a call's `authorization` metadata, `Bearer <token>` (the scheme in any
    case: RFC 7235 makes it case-insensitive); AuthError saying what is wrong otherwise."""
    if not values:
        raise AuthError("no credentials: this deployment requires a node token (sparsat certs), "
                        "sent as 'authorization: Bearer <token>'")
    if len(values) > 1:
        raise AuthError(f"{len(values)} authorization headers: send one, 'Bearer <token>'")
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer":
        if not token:
            raise AuthError("authorization 'Bearer' carries an empty token")
        return token
    if not token and scheme.startswith(f"{TOKEN_PREFIX}."):
        raise AuthError("authorization is a token without its scheme: send 'Bearer <token>'")
    shown = scheme[:16] + ("..." if len(scheme) > 16 else "")
    raise AuthError(f"authorization scheme {shown!r} is not Bearer: send 'Bearer <token>'")


class CredentialsError(ValueError):
    """Credentials that cannot be used: missing files, another deployment, a bad key."""


def check_private_file(path: Path) -> None:
    """CredentialsError unless only its owner may read and write `path` (a key or a token)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise CredentialsError(f"{path} is readable or writable by others (mode {mode:04o}): "
                               f"it is a secret; run `chmod 600 {path}`")


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    satellites: tuple[str, ...] = ()
    deployment: str = ""
    key: str = ""  # the node's public key (node.key's): base64url of the compressed P-256 point

    def describe(self) -> str:
        return f"{self.name} ({self.role})"


def deployment_id(ca_cert: x509.Certificate) -> str:
    """A short name of the deployment: the CA certificate's SHA-256, 16 hex digits."""
    return ca_cert.fingerprint(hashes.SHA256()).hex()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_token(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
               identity: Identity) -> str:
    """The token of `identity`, whose `key` (public_key_text of its node's key) signs its
    calls (sign_call)."""
    check_name(identity.name)
    if identity.role not in ROLE_NAMES:
        raise CredentialsError(f"role must be one of {ROLE_NAMES}, got {identity.role!r}")
    _public_key(identity.key)  # CredentialsError when it is not a P-256 point
    payload = json.dumps({"n": identity.name, "r": identity.role,
                          "s": list(identity.satellites), "d": deployment_id(ca_cert),
                          "k": identity.key},
                         separators=(",", ":"), sort_keys=True).encode()
    body = f"{TOKEN_PREFIX}.{_b64(payload)}"
    return f"{body}.{_b64(_raw_signature(ca_key, body.encode()))}"


def _raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 as the raw 64 bytes r||s (JWS ES256): of a fixed length, so a
    token's and a call's bytes on the radio link do not vary with the signature."""
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _verify_raw(key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> None:
    """InvalidSignature unless `signature` is `key`'s raw r||s over `message`."""
    if len(signature) != SIGNATURE_BYTES:
        raise InvalidSignature(f"a signature is {SIGNATURE_BYTES} bytes (r||s)")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                               int.from_bytes(signature[32:], "big"))
    key.verify(der, message, ec.ECDSA(hashes.SHA256()))


class TokenVerifier:
    """Checks tokens against one deployment's CA; remembers the ones it has verified (a
    node's token comes with every call: the signature is checked once)."""

    MAX_TOKEN_CHARS = 8192
    MAX_CACHED = 4096

    def __init__(self, ca_cert: x509.Certificate) -> None:
        key = ca_cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise CredentialsError("the CA certificate's key must be an EC key (sparsat certs)")
        self._key = key
        self.deployment = deployment_id(ca_cert)
        self._seen: dict[str, Identity] = {}
        self._lock = threading.Lock()

    def verify(self, token: str) -> Identity:
        with self._lock:
            known = self._seen.get(token)
        if known is not None:
            return known
        identity = self._verify(token)
        with self._lock:
            if len(self._seen) >= self.MAX_CACHED:
                self._seen.clear()
            self._seen[token] = identity
        return identity

    def _verify(self, token: str) -> Identity:
        if len(token) > self.MAX_TOKEN_CHARS:
            raise AuthError(f"token longer than {self.MAX_TOKEN_CHARS} characters")
        parts = token.split(".")
        if len(parts) == 3 and parts[0] in OLD_TOKEN_PREFIXES:
            raise AuthError(f"a {parts[0]} token, made by an older `sparsat certs` (its token "
                            "names no key to sign calls with): re-issue the deployment's "
                            "credentials with `sparsat certs`")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise AuthError(f"not a sparsat token ({TOKEN_PREFIX}.<payload>.<signature>)")
        try:
            payload, signature = _unb64(parts[1]), _unb64(parts[2])
        except (ValueError, TypeError) as e:
            raise AuthError("token is not base64") from e
        try:
            _verify_raw(self._key, signature, f"{parts[0]}.{parts[1]}".encode())
        except InvalidSignature as e:
            raise AuthError("token not signed by this deployment's CA") from e
        try:
            claims = json.loads(payload)
            identity = Identity(str(claims["n"]), str(claims["r"]),
                                tuple(str(s) for s in claims.get("s", [])), str(claims["d"]),
                                str(claims["k"]))
        except (ValueError, KeyError, TypeError) as e:
            raise AuthError("token payload unreadable") from e
        try:
            _public_key(identity.key)
        except CredentialsError as e:
            raise AuthError(f"token payload unreadable: {e}") from e
        if identity.deployment != self.deployment or identity.role not in ROLE_NAMES:
            raise AuthError("token of another deployment")
        return identity


def public_key_text(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """What a token names a node's key by: base64url of its compressed P-256 point (33 B)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return _b64(public.public_bytes(serialization.Encoding.X962,
                                    serialization.PublicFormat.CompressedPoint))


@functools.lru_cache(maxsize=1024)
def _public_key(text: str) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _unb64(text))
    except (ValueError, TypeError) as e:
        raise CredentialsError("the token's key is not a P-256 public key") from e


# ---- per-call credentials: bound to the callee, the method, the time, once -----------------
#
# Every call carries, beside the token, the metadata header CALL_HEADER:
#     sparsat-call: <t>.<nonce>.<signature>
# t: the caller's clock, milliseconds since the epoch, in decimal; nonce: 16 random bytes,
# base64url; signature: base64url of the raw 64-byte r||s (JWS ES256 form) of the caller's
# ECDSA P-256 / SHA-256 signature, with the key its token names, over call_message(): the
# deployment, the audience (the callee's node name: the name the caller checked the server's
# certificate against), the full method name, t, the nonce and the SHA-256 of the token. The
# audience and method are not sent: the callee knows its own name and the method called. A
# callee accepts one only if signed by the token's key, for itself and this method, with t at
# most CLOCK_AHEAD_S ahead of its clock and CLOCK_BEHIND_S + MAX_AGE_S behind it, t not before
# this server started, and a nonce not seen (CallChecker). So what a callee is sent works at no
# other node, for no other method, once, and not after a minute.

CALL_HEADER = "sparsat-call"
CALL_PREFIX = "sparsat-call1"
CLOCK_AHEAD_S = 5.0  # a caller's clock may run this far ahead of the callee's (NTP: ms)
CLOCK_BEHIND_S = 30.0  # ... and this far behind it
MAX_AGE_S = 30.0  # from making a call's credential to its arrival, beyond the skew
NONCE_BYTES = 16
# remembered at once per server from one node (about 6 MiB); one node cannot crowd out
# another: the memory is at most this times the nodes the CA issued
MAX_NONCES_PER_CALLER = 20_000
# the header's value exactly as sign_call writes it: t without leading zeros (16 digits at
# most), base64url without padding of 16 and 64 bytes; nothing else is read
CALL_VALUE_RE = re.compile(r"(0|[1-9][0-9]{0,15})\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{86})")


def call_message(deployment: str, audience: str, method: str, t_ms: int, nonce: str,
                 token: str) -> bytes:
    """The bytes a call's credential signs (UTF-8, lines joined by LF, no final LF)."""
    return "\n".join([CALL_PREFIX, deployment, audience, method, str(t_ms), nonce,
                      token_digest(token)]).encode()


def sign_call(key: ec.EllipticCurvePrivateKey, token: str, deployment: str, audience: str,
              method: str, t_ms: int | None = None, nonce: bytes | None = None) -> str:
    """The CALL_HEADER value for one call of `method` to the node named `audience`."""
    t_ms = int(time.time() * 1000) if t_ms is None else t_ms
    nonce_text = _b64(os.urandom(NONCE_BYTES) if nonce is None else nonce)
    signature = _raw_signature(
        key, call_message(deployment, audience, method, t_ms, nonce_text, token))
    return f"{t_ms}.{nonce_text}.{_b64(signature)}"


# the header value's length: 13 digits of time (until the year 2286), the nonce's and the
# signature's base64url (22 and 86 characters), two dots
CALL_VALUE_CHARS = 13 + 1 + 22 + 1 + 86


def credential_bytes(token: str) -> int:
    """The bytes of one call's credentials as its metadata carries them (header names and
    values, before HTTP/2's header compression): what the simulated radio link charges a
    downlink stream (sensor hosts' Send)."""
    return (len("authorization") + len("Bearer ") + len(token.encode())
            + len(CALL_HEADER) + CALL_VALUE_CHARS)


class StaleCall(AuthError):
    """A call's credential whose time is before this server's start: the process before a
    restart may have accepted it, and its nonces are forgotten. The caller retries with a new
    one (UNAVAILABLE)."""


class CallsExhausted(AuthError):
    """A caller past its share of the nonce memory (RESOURCE_EXHAUSTED)."""


class CallChecker:
    """One server's check of per-call credentials, and the nonces it has seen.

    A nonce is remembered until its credential is too old to be accepted anyway
    (CLOCK_BEHIND_S + MAX_AGE_S after its time, by this server's clock: at most a minute and
    CLOCK_AHEAD_S after it arrived), MAX_NONCES_PER_CALLER from one node; a caller past its
    share is refused (CallsExhausted: RESOURCE_EXHAUSTED) until its old nonces expire. The
    memory is this process's: after a restart it is empty, so a server also refuses
    (StaleCall) every credential whose time is before its start. What that leaves: a
    credential the process before accepted in its last CLOCK_AHEAD_S, from a caller whose
    clock ran ahead by as much, passes once more if it comes again then; only the node it was
    made for ever saw it (TLS; its audience), so only that node, or whoever holds its key,
    can bring it again, and only to itself. The time checks and the nonce memory read one
    clock, under one lock, that never goes back (a wall-clock step back does not re-open
    expired nonces)."""

    def __init__(self, audience: str, deployment: str, clock: Callable[[], float] = time.time,
                 max_per_caller: int = MAX_NONCES_PER_CALLER) -> None:
        self.audience, self.deployment, self._clock = audience, deployment, clock
        self.started_ms = int(clock() * 1000)
        self._now_ms = self.started_ms
        self.max_per_caller = max_per_caller
        self._seen: dict[str, tuple[int, str]] = {}  # nonce -> (expires_ms, caller)
        self._expiry: list[tuple[int, str]] = []  # heap of (expires_ms, nonce)
        self._per_caller: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, value: str, token: str, identity: Identity, method: str) -> None:
        """AuthError unless `value` is a fresh credential of `identity` (its token `token`)
        for this server and `method`; StaleCall, CallsExhausted as the class says."""
        found = CALL_VALUE_RE.fullmatch(value)
        if found is None:
            raise AuthError(f"{CALL_HEADER} is not <time ms>.<nonce>.<signature> (decimal, and "
                            f"base64url without padding of {NONCE_BYTES} and {SIGNATURE_BYTES} "
                            "bytes)")
        t_text, nonce, signature = found.groups()
        t_ms = int(t_text)
        message = call_message(self.deployment, self.audience, method, t_ms, nonce, token)
        try:
            _verify_raw(_public_key(identity.key), _unb64(signature), message)
        except (InvalidSignature, CredentialsError, ValueError) as e:
            raise AuthError(f"the call's credential ({CALL_HEADER}) is not {identity.name}'s "
                            f"for {self.audience} and {method} (made for another node or "
                            "method, or signed with another key than its token names; a "
                            "client names the node it dials, e.g. rpc.channel(peer=...))") from e
        ahead_ms, behind_ms = int(CLOCK_AHEAD_S * 1000), int(CLOCK_BEHIND_S * 1000)
        age_ms = int(MAX_AGE_S * 1000)
        with self._lock:
            now_ms = self._now_ms = max(self._now_ms, int(self._clock() * 1000))
            if t_ms > now_ms + ahead_ms:
                raise AuthError(f"the call's credential is {(t_ms - now_ms) / 1000:.1f} s ahead "
                                f"of this server's clock ({CLOCK_AHEAD_S:g} s allowed: keep "
                                "the nodes' clocks in time, e.g. NTP)")
            if t_ms < now_ms - behind_ms - age_ms:
                raise AuthError(f"the call's credential is {(now_ms - t_ms) / 1000:.0f} s old "
                                f"({CLOCK_BEHIND_S + MAX_AGE_S:g} s at most)")
            if t_ms < self.started_ms:
                raise StaleCall(
                    f"the call's credential was made {(self.started_ms - t_ms) / 1000:.1f} s "
                    "before this server started (what came before a restart is not accepted "
                    "again; is the caller's clock behind?): retry with a new one")
            self._expire(now_ms)
            if nonce in self._seen:
                raise AuthError("the call's credential was used before (a replay)")
            caller = identity.name
            if self._per_caller.get(caller, 0) >= self.max_per_caller:
                raise CallsExhausted(
                    f"{caller} made more than {self.max_per_caller} calls in "
                    f"{CLOCK_BEHIND_S + MAX_AGE_S:g} s; retry later")
            expires = t_ms + behind_ms + age_ms
            self._seen[nonce] = (expires, caller)
            heapq.heappush(self._expiry, (expires, nonce))
            self._per_caller[caller] = self._per_caller.get(caller, 0) + 1

    def _expire(self, now_ms: int) -> None:
        while self._expiry and self._expiry[0][0] < now_ms:
            _, nonce = heapq.heappop(self._expiry)
            _, caller = self._seen.pop(nonce)
            left = self._per_caller[caller] - 1
            if left:
                self._per_caller[caller] = left
            else:
                del self._per_caller[caller]


def token_digest(token: str) -> str:
    """What a revocation list names a token by: the SHA-256 (hex) of the whole token string,
    so every token ever issued can be revoked, with no id in its payload."""
    return hashlib.sha256(token.encode()).hexdigest()


def cert_serial(cert: x509.Certificate) -> str:
    """What a revocation list names a certificate by: its serial number, in hex."""
    return format(cert.serial_number, "x")


@dataclass(frozen=True)
class RevocationList:
    """The tokens (token_digest) and certificates (cert_serial) a deployment's CA has taken
    back, as of `issued_at` (seconds since the epoch); `signed`: the list as the CA signed it
    (`sparsat-revoked1.<payload>.<signature>`), as it travels in files and RegisterReply."""

    deployment: str
    issued_at: float
    tokens: frozenset[str] = frozenset()
    serials: frozenset[str] = frozenset()
    signed: str = ""


def sign_revocations(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     tokens: set[str] | frozenset[str], serials: set[str] | frozenset[str],
                     issued_at: float | None = None) -> RevocationList:
    """A revocation list of the CA's deployment, signed with the CA key (like tokens)."""
    at = time.time() if issued_at is None else issued_at
    payload = json.dumps({"deployment": deployment_id(ca_cert), "issued_at": at,
                          "tokens": sorted(tokens), "serials": sorted(serials)},
                         separators=(",", ":"), sort_keys=True).encode()
    body = f"{REVOKED_PREFIX}.{_b64(payload)}"
    signature = ca_key.sign(body.encode(), ec.ECDSA(hashes.SHA256()))
    return RevocationList(deployment_id(ca_cert), at, frozenset(tokens), frozenset(serials),
                          f"{body}.{_b64(signature)}")


def parse_revocations(signed: str, ca_cert: x509.Certificate) -> RevocationList:
    """The list `signed` says, checked against `ca_cert`: CredentialsError when it is not a
    list, not signed by that CA, or of another deployment."""
    key = ca_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CredentialsError("the CA certificate's key must be an EC key (sparsat certs)")
    parts = signed.strip().split(".")
    if len(parts) != 3 or parts[0] != REVOKED_PREFIX:
        raise CredentialsError(f"not a revocation list ({REVOKED_PREFIX}.<payload>.<signature>)")
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
        key.verify(signature, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature) as e:
        raise CredentialsError("revocation list not signed by this deployment's CA") from e
    try:
        claims = json.loads(payload)
        rl = RevocationList(str(claims["deployment"]), float(claims["issued_at"]),
                            frozenset(str(t) for t in claims["tokens"]),
                            frozenset(str(s) for s in claims["serials"]), signed.strip())
    except (ValueError, KeyError, TypeError) as e:
        raise CredentialsError("revocation list payload unreadable") from e
    if rl.deployment != deployment_id(ca_cert):
        raise CredentialsError("revocation list of another deployment")
    return rl


def load_revocations(path: Path, ca_cert: x509.Certificate) -> RevocationList:
    """The revocation list in file `path`; CredentialsError naming the file otherwise."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialsError(f"cannot read the revocation list {path}: {e}") from e
    try:
        return parse_revocations(text, ca_cert)
    except CredentialsError as e:
        raise CredentialsError(f"revocation list {path} refused: {e}") from e


class Revocations:
    """The revocation list a node holds; it adopts a newer one (a RegisterReply's) when the
    deployment's CA signed it and it is not older than the one held."""

    def __init__(self, ca_cert: x509.Certificate, held: RevocationList | None = None) -> None:
        self._ca = ca_cert
        self._held = held
        self._lock = threading.Lock()

    @property
    def current(self) -> RevocationList | None:
        return self._held

    def signed(self) -> bytes:
        """The list held, as signed (b"" when none): what a ground station hands out."""
        held = self._held
        return held.signed.encode() if held else b""

    def adopt(self, signed: bytes | str) -> bool:
        """Hold `signed` if it is the CA's and not older than the list held; whether it did.
        CredentialsError when it is not the CA's (or garbled)."""
        text = signed.decode(errors="replace") if isinstance(signed, bytes) else signed
        rl = parse_revocations(text, self._ca)
        with self._lock:
            if self._held is not None and rl.issued_at < self._held.issued_at:
                return False
            self._held = rl
            return True

    def token_revoked(self, token: str) -> bool:
        held = self._held
        return held is not None and bool(held.tokens) and token_digest(token) in held.tokens

    def serial_revoked(self, serial: str) -> bool:
        held = self._held
        return held is not None and serial in held.serials


@dataclass(frozen=True)
class Credentials:
    """One node's TLS material and identity token, verified against its CA at load."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    token: str
    mutual: bool = False  # servers require client certificates of the deployment
    identity: Identity = field(default=Identity("", ""))
    verifier: TokenVerifier | None = field(default=None, compare=False, repr=False)
    revocations: Revocations | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def from_files(ca: Path, cert: Path, key: Path, token: Path | str,
                   mutual: bool = False, revoked: Path | None = None) -> Credentials:
        """Load and check: the certificate is the CA's and names the token's node; `revoked`:
        a revocation list file of the same CA (refused, naming it, when it is not)."""
        texts: dict[str, bytes] = {}
        for what, path in (("CA certificate", ca), ("certificate", cert), ("key", key)):
            try:
                texts[what] = Path(path).read_bytes()
                if what == "key":
                    check_private_file(Path(path))
            except OSError as e:
                raise CredentialsError(f"cannot read the {what} {path}: {e.strerror}") from e
        if isinstance(token, Path):
            try:
                check_private_file(token)
                token = token.read_text().strip()
            except OSError as e:
                raise CredentialsError(f"cannot read the token {token}: {e.strerror}") from e
        try:
            ca_cert = x509.load_pem_x509_certificate(texts["CA certificate"])
            node_cert = x509.load_pem_x509_certificate(texts["certificate"])
            private = serialization.load_pem_private_key(texts["key"], password=None)
        except ValueError as e:
            raise CredentialsError(f"unreadable PEM in {ca}, {cert} or {key}: {e}") from e
        if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
                private.curve, ec.SECP256R1):
            raise CredentialsError(f"{key} is not a P-256 key (sparsat certs makes them)")
        verifier = TokenVerifier(ca_cert)
        try:
            identity = verifier.verify(token)
        except AuthError as e:
            raise CredentialsError(f"the token does not belong to the CA {ca}: {e}") from e
        try:
            node_cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CredentialsError(f"{cert} is not signed by the CA {ca}") from e
        names = cert_names(node_cert)
        if identity.name not in names:
            raise CredentialsError(f"{cert} is for {names}, the token for {identity.name!r}")
        if identity.key != public_key_text(private):
            raise CredentialsError(f"the token names another key than {key}: the key and the "
                                   "token are of different issues (re-run `sparsat certs`)")
        if public_key_text(node_cert.public_key()) != identity.key:  # type: ignore[arg-type]
            raise CredentialsError(f"{cert} holds another key than the token names")
        refusal = reserved_refusal(identity.name, identity.role) or cert_refusal(
            node_cert, identity)
        if refusal:
            raise CredentialsError(f"{cert}: {refusal}")
        held = load_revocations(revoked, ca_cert) if revoked is not None else None
        return Credentials(texts["CA certificate"], texts["certificate"], texts["key"], token,
                           mutual, identity, verifier, Revocations(ca_cert, held))

    @staticmethod
    def from_dir(path: Path, mutual: bool = False) -> Credentials:
        """A node's folder as `sparsat certs` writes it: ca.crt, node.crt, node.key, token,
        and the revocation list `revoked` when there is one."""
        path = Path(path)
        if not path.is_dir():
            raise CredentialsError(f"credentials folder {path} not found (make one with "
                                   "`sparsat certs`)")
        missing = [f for f in CREDENTIAL_FILES if not (path / f).exists()]
        if missing:
            raise CredentialsError(f"{path} lacks {', '.join(missing)} (a node's folder made by "
                                   "`sparsat certs` has ca.crt, node.crt, node.key, token)")
        revoked = path / REVOKED_FILE
        return Credentials.from_files(path / "ca.crt", path / "node.crt", path / "node.key",
                                      path / "token", mutual,
                                      revoked if revoked.exists() else None)


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return []


def cert_refusal(cert: x509.Certificate, identity: Identity) -> str | None:
    """Why `cert` (the CA's) cannot go with `identity`'s token: its role differs from the
    token's, or its names include a reserved name of another role; None when it can."""
    role = cert_role(cert)
    if role and role != identity.role:
        return f"the certificate is a {role}'s, the token {identity.describe()}'s"
    for name in cert_names(cert):
        refusal = reserved_refusal(name, role or identity.role)
        if refusal:
            return f"the certificate names {name!r}: {refusal}"
    return None


@functools.lru_cache(maxsize=256)
def _peer_cert(pem: bytes) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None


def client_cert_refusal(pem: bytes, identity: Identity) -> str | None:
    """Why a verified client certificate (PEM, as mutual TLS handed it over) cannot go with
    `identity`'s token (cert_refusal), else None; parsed once per certificate."""
    cert = _peer_cert(pem)
    if cert is None:
        return "the client certificate is unreadable"
    if identity.name not in cert_names(cert):
        return f"the client certificate is for {cert_names(cert)}, the token for {identity.name}"
    refusal = cert_refusal(cert, identity)
    if refusal:
        return refusal
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public_key_text(
            public) != identity.key:
        return f"the client certificate holds another key than {identity.name}'s token names"
    return None


def client_cert_serial(pem: bytes) -> str | None:
    """The serial (cert_serial) of a client certificate as mutual TLS handed it over."""
    cert = _peer_cert(pem)
    return cert_serial(cert) if cert is not None else None


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise CredentialsError(
            f"node name {name[:64]!r} must be a DNS label: lowercase letters, digits and '-', "
            "at most 63 characters, not starting or ending with '-'")
    return name


def fingerprint(pem: bytes) -> str:
    return hashlib.sha256(pem).hexdigest()[:16]


# ---- this process's configuration ---------------------------------------------------------

_active: Credentials | None = None


def configure(creds: Credentials | None) -> None:
    """Use `creds` for every server and channel this process makes from now (None: plaintext,
    no authentication)."""
    global _active
    _active = creds


def active() -> Credentials | None:
    return _active
