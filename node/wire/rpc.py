"""gRPC plumbing shared by every node: message limits, byte accounting, servers, channels."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from sparsat.node.wire import control, security
from sparsat.node.wire.security import AuthError, Identity
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

GRPC_FRAME_BYTES = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # explicit, both directions; large tensors are chunked below
# a control call's request message (Health, Transmit, Describe, Stats...: a few fields), at most;
# servers size it before parsing (make_server's max_request_bytes)
MAX_CONTROL_BYTES = 64 << 10
CHUNK_BYTES = 1024 * 1024  # target size of one streamed dataset chunk

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # big downlink batches: fewer HTTP/2 frames and socket reads (bench/transport.py: gRPC
    # over raw TCP 0.25-0.29 -> 0.31-0.33 at 1 MiB batches)
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
]


def wire_size(message: Any) -> int:
    """Bytes a message costs on a link: its serialized size plus gRPC's frame."""
    return int(message.ByteSize()) + GRPC_FRAME_BYTES


def received_size(context: Any, message: Any) -> int:
    """Bytes the request message a servicer just took from its iterator (or got, unary)
    cost on the link: its length as it arrived plus gRPC's frame, which differs from
    wire_size when the sender's encoder is not Python's (fields out of order, empty fields
    written, packed runs split). The Guard records it; wire_size for an in-process call."""
    size = getattr(context, "request_bytes", None)
    return int(size) if size is not None else wire_size(message)


def sized(parse: Callable[[bytes], M], max_bytes: int | None = None
          ) -> Callable[[bytes], tuple[M | None, int]]:
    """A response deserializer that also gives each message's wire size as received (its
    length plus gRPC's frame), for clients that charge what arrived. A message of more than
    `max_bytes` is not parsed: (None, its size), for the caller to refuse."""
    def parse_sized(raw: bytes) -> tuple[M | None, int]:
        if max_bytes is not None and len(raw) > max_bytes:
            return None, len(raw) + GRPC_FRAME_BYTES
        return parse(raw), len(raw) + GRPC_FRAME_BYTES
    return parse_sized


INSTANCE = uuid.uuid4().hex  # this process: a node that restarts gets another one

M = TypeVar("M")


class Outbox(Generic[M]):
    """The request stream of a client-streaming call, counting what went out.

    gRPC Python pulls the next request only once the previous one's write has completed
    (handed to the transport), so a message is counted when the next is asked for, or when
    the stream ends. A call that fails half way is charged the messages written before it
    failed, and nothing when the connection was refused (the first write never completes).
    """

    def __init__(self, messages: Iterable[M]) -> None:
        self._messages = messages
        self.written = 0  # messages
        self.bytes = 0  # their wire size

    def __iter__(self) -> Iterator[M]:
        for msg in self._messages:
            yield msg
            self.written += 1
            self.bytes += wire_size(msg)


class ByteCounter:
    """Thread-safe totals of bytes received and sent by a node (servicers run in a pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.sent = 0

    def add(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.received += received
            self.sent += sent


Precheck = Callable[[bytes], None]  # raises ValueError naming what is wrong with raw bytes


def at_most(limit: int) -> Precheck:
    """A precheck refusing a request message of more than `limit` bytes before it is parsed
    (a control call's message is small; 64 MiB of repeated fields parse into a gigabyte)."""
    def check(raw: bytes) -> None:
        if len(raw) > limit:
            raise ValueError(f"more than the {limit} bytes this call's message may have")
    return check


def make_server(max_workers: int = 8, prechecks: dict[str, Precheck] | None = None,
                max_request_bytes: int | None = None) -> grpc.Server:
    """A server whose calls run on `max_workers` threads (a streaming call holds one for its
    whole life: a server taking long streams sizes the pool above their cap, so that short
    calls always find a thread). At most 2 x max_workers calls are in flight (running or
    waiting for a thread, each holding at most one received message of MAX_MESSAGE_BYTES);
    more are RESOURCE_EXHAUSTED. `prechecks[method]` sees each request's raw bytes before
    they are parsed (a ValueError is INVALID_ARGUMENT); a method without one is held to
    `max_request_bytes` when given."""
    default = at_most(max_request_bytes) if max_request_bytes is not None else None
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_OPTIONS,
                       interceptors=[Guard(security.active(), prechecks, default)],
                       maximum_concurrent_rpcs=2 * max_workers)


def bind(server: grpc.Server, listen: str, advertise: str | None = None,
         toward: str | None = None) -> str:
    """Bind `listen` (host:port, port 0 for a free one), with TLS when this process has
    credentials; returns the address other nodes should dial: `advertise` (HOST or HOST:PORT)
    when given, else the listen address, where a wildcard host (0.0.0.0) becomes this
    machine's address on the route `toward` a HOST:PORT (the ground station)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    creds = security.active()
    if creds is None:
        bound = server.add_insecure_port(listen)
    else:
        bound = server.add_secure_port(listen, grpc.ssl_server_credentials(
            [(creds.key_pem, creds.cert_pem)],
            root_certificates=creds.ca_pem if creds.mutual else None,
            require_client_auth=creds.mutual))
    if bound == 0:
        raise OSError(f"cannot listen on {listen}")
    if advertise:
        a_host, _, a_port = advertise.rpartition(":")
        if a_port.isdigit() and a_host:
            return advertise
        return f"{advertise}:{bound}"
    if host in ("0.0.0.0", "[::]", "::"):
        host = routable_host(toward)
    return f"{host}:{bound}"


def routable_host(toward: str | None) -> str:
    """This machine's address on the route to `toward` (HOST:PORT; a UDP socket is connected,
    nothing is sent), else its host name's address, else 127.0.0.1."""
    if toward:
        t_host, _, t_port = toward.rpartition(":")
        t_host = t_host.strip("[]")
        try:
            family = socket.AF_INET6 if ":" in t_host else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((t_host, int(t_port) if t_port.isdigit() else 9))
                return str(s.getsockname()[0])
        except (OSError, ValueError):
            pass
    try:
        found = socket.gethostbyname(socket.gethostname())
        if not ipaddress.ip_address(found).is_loopback:
            return found
    except (OSError, ValueError):
        pass
    return "127.0.0.1"


# channel(creds=...): this process's credentials (sparsat.node.wire.security.active)
_PROCESS = object()


def channel(address: str, peer: str | None = None,
            creds: security.Credentials | None | object = _PROCESS) -> grpc.Channel:
    """A channel to `address`. With credentials (this process's, sparsat.node.wire.security) it is
    TLS,
    checks that the server's certificate is the deployment's and names `peer` (the node
    meant: names stay when addresses change; without `peer`, the address's host), and every
    call carries this node's token."""
    if creds is _PROCESS:
        creds = security.active()
    assert creds is None or isinstance(creds, security.Credentials)
    if creds is None:
        return grpc.insecure_channel(address, options=_OPTIONS)
    tls = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    audience = peer or _host(address)
    calls = grpc.metadata_call_credentials(_CallSigner(creds, audience),
                                           name="sparsat-call")
    options: list[tuple[str, Any]] = list(_OPTIONS)
    if peer:
        options.append(("grpc.ssl_target_name_override", peer))
    return grpc.secure_channel(address, grpc.composite_channel_credentials(tls, calls),
                               options=options)


def _host(address: str) -> str:
    """The host of HOST:PORT (or [V6]:PORT), as a channel's audience when no peer is named."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]")


class _CallSigner(grpc.AuthMetadataPlugin):  # type: ignore[misc]
    """Every call's credentials: this node's token, and a per-call credential for `audience`
    and the method called (security.sign_call; docs/protocol.md)."""

    def __init__(self, creds: security.Credentials, audience: str) -> None:
        key = serialization.load_pem_private_key(creds.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._key, self._token, self._audience = key, creds.token, audience
        self._bearer = f"Bearer {creds.token}"
        self._deployment = security.deployment_id(
            x509.load_pem_x509_certificate(creds.ca_pem))

    def __call__(self, context: grpc.AuthMetadataContext,
                 callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            # service_url: https://AUTHORITY/PACKAGE.SERVICE; method_name: the method's name
            service = context.service_url.rpartition("/")[2]
            method = f"/{service}/{context.method_name}"
            value = security.sign_call(self._key, self._token, self._deployment,
                                       self._audience, method)
        except Exception as e:  # the call fails with it (UNAVAILABLE) rather than hang
            callback(None, e)
            return
        callback((("authorization", self._bearer), (security.CALL_HEADER, value)), None)


class Unreachable(grpc.FutureTimeoutError):
    """A node could not be reached; the message names its address (a one-line CLI error)."""


class Refused(RuntimeError):
    """A node's request was refused for a reason retrying cannot change (one-line CLI error)."""


# A node may start before its ground station: it keeps trying this long, saying so every
# REGISTER_LOG_S, then gives up naming the address it could not reach.
REGISTER_WAIT_S = 60.0
REGISTER_LOG_S = 5.0
REGISTER_CALL_S = 10.0  # one Register call, once connected


def wait_ready(ch: grpc.Channel, timeout_s: float = 30.0, address: str = "") -> None:
    """Wait until `ch` connects; Unreachable (naming `address`) after `timeout_s`."""
    try:
        grpc.channel_ready_future(ch).result(timeout=timeout_s)
    except grpc.FutureTimeoutError as e:
        raise Unreachable(f"{address or 'the server'} not reachable in {timeout_s:g} s") from e


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """context.abort, typed: it always raises, so code after it is unreachable."""
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


@dataclass(frozen=True)
class Registered:
    """What a Register call answered: the node's configuration, and which ground-station
    process took the registration (its INSTANCE; "" from a ground station that does not say),
    so a node can tell a restart from the first Health check on (node/processes/rejoin.py)."""

    config_json: str
    instance: str


def register(ground_station: str, request: pb.RegisterRequest,
             timeout_s: float | None = None, log_every_s: float | None = None) -> Registered:
    """Register with the ground station (register_reply); returns its configuration and
    instance."""
    reply = register_reply(ground_station, request, timeout_s, log_every_s)
    return Registered(str(reply.config_json), str(reply.instance))


def register_reply(ground_station: str, request: pb.RegisterRequest,
                   timeout_s: float | None = None,
                   log_every_s: float | None = None) -> pb.RegisterReply:
    """Register with the ground station; returns its reply. Waits up to `timeout_s`
    (default REGISTER_WAIT_S) for it to come up, with a line in the log every `log_every_s`
    (REGISTER_LOG_S), then Unreachable names the address; a refusal (bad request, wrong
    credentials) is Refused at once, with the ground station's reason: retrying cannot
    change it."""
    timeout_s = REGISTER_WAIT_S if timeout_s is None else timeout_s
    log_every_s = REGISTER_LOG_S if log_every_s is None else log_every_s
    host, _, port = ground_station.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ground station address must be HOST:PORT, got {ground_station!r}")
    ch = channel(ground_station, peer=security.GROUND_STATION)
    t0 = time.monotonic()
    last = "no answer"
    try:
        while True:
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                raise Unreachable(f"ground station {ground_station} not reachable in "
                                  f"{timeout_s:g} s ({last}); is the address right?")
            try:
                wait_ready(ch, min(left, log_every_s), ground_station)
                reply: pb.RegisterReply = pb_grpc.RegistryStub(ch).Register(
                    request, timeout=REGISTER_CALL_S)
                _adopt_revocations(control.reply_revoked(reply), ground_station)
                return reply
            except Unreachable:
                last = "no connection"
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise Refused(f"ground station {ground_station} refused to register "
                                  f"{request.node_id[:64]!r}: {e.code().name}: "
                                  f"{e.details()}") from e
                last = f"{e.code().name}: {e.details()}"
                time.sleep(min(1.0, max(0.0, timeout_s - (time.monotonic() - t0))))
            if time.monotonic() - t0 < timeout_s:  # else the error below says it
                log.warning("%s: ground station %s not reachable yet (%.0f s of %g s; %s)",
                            request.node_id[:64], ground_station, time.monotonic() - t0,
                            timeout_s, last)
    finally:
        ch.close()


def _adopt_revocations(signed: bytes, ground_station: str) -> None:
    """Hold the revocation list a RegisterReply carried, if the CA signed it and it is not
    older than the one this node holds (security.Revocations.adopt)."""
    creds = security.active()
    if not signed or creds is None or creds.revocations is None:
        return
    try:
        if creds.revocations.adopt(signed):
            held = creds.revocations.current
            log.info("revocation list from the ground station %s adopted (%d tokens, "
                     "%d certificates revoked)", ground_station,
                     len(held.tokens) if held else 0, len(held.serials) if held else 0)
    except security.CredentialsError as e:
        log.warning("ground station %s sent a revocation list that is refused: %s",
                    ground_station, e)


# ---- the server side of every call: who is calling, can we read it, and logs -------------

log = logging.getLogger("sparsat.rpc")


def caller(context: grpc.ServicerContext) -> Identity | None:
    """The verified identity of the node making this call; None when security is off (or the
    method is open to anyone)."""
    return getattr(context, "identity", None)


class _Context:
    """A servicer context that also carries the caller's verified identity and the wire size
    of the request message the servicer was last handed, as received (received_size)."""

    def __init__(self, context: grpc.ServicerContext, identity: Identity | None) -> None:
        self._context = context
        self.identity = identity
        self.request_bytes: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _header(context: grpc.ServicerContext, name: str) -> list[str]:
    """The values of the call's metadata header `name`, as text."""
    return [value if isinstance(value, str) else value.decode(errors="replace")
            for key, value in context.invocation_metadata() if key == name]


def _bearer(context: grpc.ServicerContext) -> str:
    """The token of the call's `authorization` header (security.bearer_token)."""
    return security.bearer_token(_header(context, "authorization"))


def _authenticate(method: str, context: grpc.ServicerContext,
                  creds: security.Credentials | None,
                  calls: security.CallChecker | None = None) -> Identity | None:
    """The caller's identity, or abort: UNAUTHENTICATED without a valid token of this
    deployment and a fresh per-call credential for this server and `method` (`calls`;
    UNAVAILABLE for one made before this server started, RESOURCE_EXHAUSTED past the
    caller's share of the nonces), PERMISSION_DENIED for a role `method` does not admit."""
    admitted = security.roles_for(method)
    if creds is None or admitted is None:
        return None
    if admitted is False:
        abort(context, grpc.StatusCode.PERMISSION_DENIED, f"{method} is not served to anyone")
    try:
        token = _bearer(context)
    except AuthError as e:
        abort(context, grpc.StatusCode.UNAUTHENTICATED, str(e))
    assert creds.verifier is not None
    try:
        identity = creds.verifier.verify(token)
    except AuthError as e:
        abort(context, grpc.StatusCode.UNAUTHENTICATED, f"bad credentials: {e}")
    revocations = creds.revocations
    if revocations is not None and revocations.token_revoked(token):
        abort(context, grpc.StatusCode.UNAUTHENTICATED,
              f"credentials revoked: {identity.describe()}'s token was re-issued "
              "(sparsat certs)")
    refusal = security.reserved_refusal(identity.name, identity.role)
    if refusal:  # a token minted past `sparsat certs`' checks
        abort(context, grpc.StatusCode.PERMISSION_DENIED, f"{identity.describe()}: {refusal}")
    if creds.mutual:
        auth = context.auth_context()
        names = auth.get("x509_common_name", [])
        if [n.decode(errors="replace") for n in names] != [identity.name]:
            abort(context, grpc.StatusCode.UNAUTHENTICATED,
                  f"the client certificate does not belong to {identity.name}")
        # the certificate's role too: a trainer's certificate named ground-station carrying
        # the ground station's token is not the ground station
        pems = auth.get("x509_pem_cert", [])
        if len(pems) != 1:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "the client certificate is missing")
        serial = security.client_cert_serial(pems[0])
        if revocations is not None and serial is not None and revocations.serial_revoked(serial):
            abort(context, grpc.StatusCode.UNAUTHENTICATED,
                  f"credentials revoked: {identity.describe()}'s client certificate was "
                  "re-issued (sparsat certs)")
        # its role and key too (the key the token names: the token is bound to it)
        refusal = security.client_cert_refusal(pems[0], identity)
        if refusal:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, refusal)
    if calls is not None:
        values = _header(context, security.CALL_HEADER)
        if len(values) != 1:
            abort(context, grpc.StatusCode.UNAUTHENTICATED,
                  f"{len(values)} {security.CALL_HEADER} headers: every call carries one, "
                  "signed for its callee and method (docs/protocol.md)")
        try:
            calls.check(values[0], token, identity, method)
        except security.StaleCall as e:
            abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except security.CallsExhausted as e:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except AuthError as e:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, f"bad credentials: {e}")
    assert isinstance(admitted, frozenset)
    if identity.role not in admitted:
        abort(context, grpc.StatusCode.PERMISSION_DENIED,
              f"{identity.describe()} may not call {method}")
    return identity


def credential_bytes_received(context: grpc.ServicerContext) -> int:
    """The bytes of the call's credentials (security.credential_bytes of the token the Guard
    checked: header names and values, as the caller writes them, whatever padding came), 0
    for a call not authenticated (no credentials, --insecure): a downlink stream's share of
    the radio link. Computed when asked (once a stream), not on every call."""
    return security.credential_bytes(_bearer(context)) if caller(context) is not None else 0


def _describe_failure(method: str, context: Any, identity: Identity | None,
                      error: BaseException) -> None:
    who = identity.describe() if identity else "an unauthenticated caller"
    code = context.code() if hasattr(context, "code") else None
    if code is not None and code != grpc.StatusCode.OK:
        details = context.details() if hasattr(context, "details") else ""
        if isinstance(details, bytes):
            details = details.decode(errors="replace")
        log.warning("%s from %s at %s: %s: %s", method, who, context.peer(), code.name,
                    str(details)[:300])
    elif not isinstance(error, GeneratorExit):
        log.error("%s from %s at %s failed", method, who, context.peer(), exc_info=error)


def _parse(parse: Callable[[bytes], Any], method: str, raw: Any, context: Any,
           precheck: Precheck | None = None) -> Any:
    if not isinstance(raw, bytes):  # already a message (an in-process handler)
        return raw
    if isinstance(context, _Context):
        context.request_bytes = len(raw) + GRPC_FRAME_BYTES
    if precheck is not None:
        try:
            precheck(raw)
        except ValueError as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"{method}: request message refused before parsing ({len(raw)} bytes): "
                  f"{str(e)[:200]}")
    try:
        return parse(raw)
    except (DecodeError, ValueError, RuntimeError) as e:  # protobuf's errors vary by backend
        abort(context, grpc.StatusCode.INVALID_ARGUMENT,
              f"{method}: undecodable request message ({len(raw)} bytes): {str(e)[:120]}")


def _guarded(handler: grpc.RpcMethodHandler, method: str,
             creds: security.Credentials | None,
             precheck: Precheck | None = None,
             calls: security.CallChecker | None = None) -> grpc.RpcMethodHandler:
    """`handler` with the caller checked first, its requests parsed here (undecodable bytes
    are INVALID_ARGUMENT, not INTERNAL with a traceback) and failures logged with the call,
    the peer and the caller."""
    parse = handler.request_deserializer
    serialize = handler.response_serializer
    if parse is None:  # nothing to parse (raw bytes): leave it alone
        parse = bytes  # type: ignore[assignment]

    def requests(raw: Iterator[Any], context: Any) -> Iterator[Any]:
        for item in raw:
            yield _parse(parse, method, item, context, precheck)

    def call(behavior: Callable[..., Any], request: Any, ctx: _Context,
             streaming_in: bool) -> Any:
        ctx.identity = _authenticate(method, ctx._context, creds, calls)
        req = (requests(request, ctx) if streaming_in
               else _parse(parse, method, request, ctx, precheck))
        return behavior(req, ctx)

    if handler.response_streaming:
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            ctx = _Context(context, None)
            try:
                yield from call(behavior, request, ctx, handler.request_streaming)
            except BaseException as e:
                _describe_failure(method, context, ctx.identity, e)
                raise

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, None, serialize)
        return grpc.unary_stream_rpc_method_handler(streaming, None, serialize)

    unary_behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        ctx = _Context(context, None)
        try:
            return call(unary_behavior, request, ctx, handler.request_streaming)
        except BaseException as e:
            _describe_failure(method, context, ctx.identity, e)
            raise

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, None, serialize)
    return grpc.unary_unary_rpc_method_handler(unary, None, serialize)


class Guard(grpc.ServerInterceptor):
    """Puts every method of a server behind `_guarded`, checking callers against `creds`
    (the server's: its CA, mutual TLS or not; None: no authentication)."""

    def __init__(self, creds: security.Credentials | None,
                 prechecks: dict[str, Precheck] | None = None,
                 default: Precheck | None = None) -> None:
        self.creds = creds
        self.prechecks = prechecks or {}
        self.default = default
        # the per-call credentials' check, and its nonces, for this server
        self.calls = (security.CallChecker(creds.identity.name, creds.verifier.deployment)
                      if creds is not None and creds.verifier is not None else None)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method  # type: ignore[attr-defined]
        return _guarded(handler, method, self.creds, self.prechecks.get(method, self.default),
                        self.calls)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_standard_services(server: grpc.Server, services: list[str]) -> None:
    """The standard grpc.health.v1 service (Check, Watch and List: SERVING for "" and each
    of `services`, so orchestrators and grpc_health_probe work) and server reflection, v1
    and v1alpha (grpcurl, grpcui; both open, like health: see sparsat.node.wire.security.ROLES)."""
    checker = _Health()
    for name in ["", *services]:
        checker.set(name, _SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    names = [*services, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    reflection.enable_server_reflection(names, server)
    # v1 is v1alpha renamed, message for message: the same servicer answers it, and its
    # descriptor is registered so that reflection can describe itself under either name
    _register_reflection_v1()
    v1 = reflection.ReflectionServicer(names)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            v1.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


_SERVING = health_pb2.HealthCheckResponse.SERVING


class _Health(health.HealthServicer):  # type: ignore[misc]
    """grpcio's health servicer, which answers Check and Watch, with List as well (it leaves
    List unimplemented: an error with a traceback in the log)."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {}
        self._list_lock = threading.Lock()

    def set(self, service: str, status: int) -> None:
        super().set(service, status)
        with self._list_lock:
            self._statuses[service] = status

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._list_lock:
            statuses = dict(self._statuses)
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
            for name, status in statuses.items()})


def _register_reflection_v1() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default descriptor pool: v1alpha's
    file with its package renamed (grpcio-reflection ships only v1alpha)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    fdp.name, fdp.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    fdp.ClearField("options")
    for message in fdp.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for service in fdp.service:
        for m in service.method:
            m.input_type, m.output_type = (m.input_type.replace(old, new),
                                           m.output_type.replace(old, new))
    pool.Add(fdp)
