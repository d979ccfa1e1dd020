"""What every nestmmu server shares: logging, request ids, health, reflection, errors, shutdown.

The servers are thin adapters over :mod:`nestmmu.core`; this module keeps the adapter code
that is not about any one level in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import structlog
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

REQUEST_ID_KEY = "x-request-id"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

#: Deadline for every RPC one level makes to another (seconds).
RPC_DEADLINE = 10.0
#: How long L0 waits for one vCPU to acknowledge an invalidation before disconnecting it.
BROADCAST_ACK_TIMEOUT = 2.0
#: How long L0 waits for its L1 to answer a walk, a memory access or an exit.
L1_CALL_TIMEOUT = 5.0

# ---------------------------------------------------------------- connection health
# One keepalive policy for every server and every client channel (grpc doc/keepalive.md):
# a client may ping no more often than the server accepts, or the server answers GOAWAY
# "too_many_pings" and every stream on that connection (an L1's Connect, a vCPU's Run) ends.
#: Clients ping an idle connection every CLIENT_KEEPALIVE_MS and drop it when the ack has
#: not come within KEEPALIVE_TIMEOUT_MS: a dead or wedged server is noticed within 15 s.
CLIENT_KEEPALIVE_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
#: Servers accept client pings as often as every SERVER_MIN_PING_INTERVAL_MS (half the client
#: interval: a ping delayed by a busy event loop followed by a punctual one is not a strike).
SERVER_MIN_PING_INTERVAL_MS = 5_000
#: Servers ping idle clients (a vCPU or L1 that vanished without a FIN) every
#: SERVER_KEEPALIVE_MS: a dead client is noticed within 20 s + 5 s.
SERVER_KEEPALIVE_MS = 20_000
# grpcio 1.85 closes a transport whose ping went unanswered after grpc.http2.ping_timeout_ms
# (default 60 s), not after keepalive_timeout_ms alone: both are set to KEEPALIVE_TIMEOUT_MS
# (measured: a SIGSTOPped server is noticed after 15 s with it, not within 40 s without).
MAX_MESSAGE_BYTES = 64 << 20

_MESSAGE_OPTIONS: list[tuple[str, int]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def server_options() -> list[tuple[str, int]]:
    """grpc.aio.server options: the keepalive policy, message sizes, and no SO_REUSEPORT (a
    second server on a busy port must fail to bind, not share the port silently)."""
    assert CLIENT_KEEPALIVE_MS >= SERVER_MIN_PING_INTERVAL_MS, "clients would ping faster than servers allow"
    return [
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
        *_MESSAGE_OPTIONS,
    ]


def channel_options() -> list[tuple[str, int]]:
    """Options of every client channel (L1->L0, L2->L0, L2->L1, the CLI): agrees with server_options()."""
    return [
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        *_MESSAGE_OPTIONS,
    ]


def insecure_channel(address: str) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` with the project's keepalive policy."""
    return grpc.aio.insecure_channel(address, options=channel_options())


class Health:
    """A service's own view of whether it can do its job, applied to its health service.

    The service calls :meth:`set` whenever that changes (an L1 losing its L0 session, an L2
    losing every L0); serve_forever applies it once the server is up and past its gate.
    """

    def __init__(self, serving: bool = True) -> None:
        self.serving = serving
        self._apply: Callable[[bool], Awaitable[None]] | None = None
        self._applied: bool | None = None
        self._task: asyncio.Task[None] | None = None

    def set(self, serving: bool) -> None:
        self.serving = serving
        if self._apply is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        while self._apply is not None and self._applied != self.serving:
            want = self.serving
            await self._apply(want)
            self._applied = want

    async def bind(self, apply: Callable[[bool], Awaitable[None]] | None) -> None:
        self._apply = apply
        self._applied = None
        if apply is not None:
            await self._sync()


class _Corrupt:
    """A request whose bytes did not parse (answered INVALID_ARGUMENT, not UNKNOWN)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class CorruptRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answer request bytes that do not parse as the method's message with INVALID_ARGUMENT.

    grpcio turns an exception raised by the request deserializer into UNKNOWN. This
    interceptor wraps the deserializer so it returns a marker instead of raising, and the
    handler aborts with INVALID_ARGUMENT (google.rpc.BadRequest) when it meets the marker.
    """

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        method = details.method

        def deserialize(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception as e:  # DecodeError and friends
                return _Corrupt(e)

        async def reject(context: grpc.aio.ServicerContext, bad: _Corrupt) -> None:
            desc = f"the request bytes are not a valid {method.rsplit('/', 1)[-1]} request message ({bad.error})"
            await context.abort_with_status(bad_request(desc, [("request", desc)]))

        async def checked_stream(it: Any, context: grpc.aio.ServicerContext) -> Any:
            async for req in it:
                if isinstance(req, _Corrupt):
                    await reject(context, req)
                yield req

        kw = {"request_deserializer": deserialize, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Corrupt):
                    await reject(context, request)
                return await uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.unary_stream is not None:
            us = handler.unary_stream

            if not inspect.isasyncgenfunction(us):  # writes with context.write (Health.Watch)

                async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    if isinstance(request, _Corrupt):
                        await reject(context, request)
                    return await us(request, context)

                return grpc.unary_stream_rpc_method_handler(unary_stream_writer, **kw)

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Corrupt):
                    await reject(context, request)
                async for resp in us(request, context):
                    yield resp

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        if handler.stream_unary is not None:
            su = handler.stream_unary

            async def stream_unary(it: Any, context: grpc.aio.ServicerContext) -> Any:
                return await su(checked_stream(it, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        ss = handler.stream_stream

        async def stream_stream(it: Any, context: grpc.aio.ServicerContext) -> Any:
            async for resp in ss(checked_stream(it, context), context):
                yield resp

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """structlog: JSON to stdout when not a TTY (or when asked), console on a TTY."""
    if json is None:
        json = not sys.stdout.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Bind a request id (from metadata or fresh) to the log context; one line per unary RPC."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.log = structlog.get_logger(service)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        rid = dict(details.invocation_metadata or ()).get(REQUEST_ID_KEY) or new_request_id()
        method = details.method
        inner = handler.unary_unary
        log = self.log

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id_var.set(rid)
            structlog.contextvars.bind_contextvars(request_id=rid)
            t0 = time.perf_counter()
            try:
                resp = await inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return resp
            except Exception:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                if not method.startswith("/grpc."):
                    log.info("rpc", method=method, code=getattr(code, "name", str(code)), ms=round((time.perf_counter() - t0) * 1e3, 3))
                structlog.contextvars.unbind_contextvars("request_id")

        return grpc.unary_unary_rpc_method_handler(wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def bad_request(message: str, violations: Iterable[tuple[str, str]]) -> grpc.Status:
    """INVALID_ARGUMENT with google.rpc.BadRequest field violations."""
    br = error_details_pb2.BadRequest()
    for fld, desc in violations:
        br.field_violations.add(field=fld, description=desc)
    st = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    st.details.add().Pack(br)
    status: grpc.Status = rpc_status.to_status(st)
    return status


async def abort_invalid(context: grpc.aio.ServicerContext, fld: str, desc: str) -> None:
    await context.abort_with_status(bad_request(f"{fld}: {desc}", [(fld, desc)]))


def _cannot_bind(host: str, port: int) -> str | None:
    """Why host:port cannot be listened on (e.g. "address already in use"), or None if it can."""
    if port == 0:
        return None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is fine
            s.bind(addr)
    except OSError as e:
        return (e.strerror or str(e)).lower()
    return None


class ListenError(Exception):
    """The server could not bind its port (the CLI prints it as one line and exits 3)."""


def metadata_with_request_id(rid: str | None = None) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, rid or request_id_var.get() or new_request_id()),)


async def serve_forever(
    name: str,
    port: int,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    on_stop: Callable[[], Awaitable[None]] | None = None,
    host: str = "0.0.0.0",
    ready: asyncio.Event | None = None,
    gate: Callable[[], Awaitable[object]] | None = None,
    health_state: Health | None = None,
) -> None:
    """Start a grpc.aio server with health and reflection, serve until SIGTERM/SIGINT.

    Health says NOT_SERVING until ``gate`` (if given) completes: an L1 is not usable before
    it has registered with L0, and orchestrators start dependants on health. After the gate,
    ``health_state`` (if given) decides: the service flips it when it loses or regains what it
    needs (see :class:`Health`).
    """
    log = structlog.get_logger(name)
    server = grpc.aio.server(interceptors=[RequestIdInterceptor(name), CorruptRequestInterceptor()], options=server_options())
    services = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    problem = _cannot_bind(host, port)  # ask the OS first: grpc would log its own error lines
    if problem:
        raise ListenError(f"{name}: cannot listen on {host}:{port} ({problem})")
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio raises when the bind fails (port in use, address not local)
        bound = 0
    if bound == 0:
        raise ListenError(f"{name}: cannot listen on {host}:{port} (address in use or not available)")
    await server.start()
    for svc in [*services, ""]:
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def mark_serving() -> None:
        if gate is not None:
            await gate()

        async def apply(serving: bool) -> None:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for svc in [*services, ""]:
                await health_servicer.set(svc, status)
            log.info("health", status=health_pb2.HealthCheckResponse.ServingStatus.Name(status))

        await (health_state or Health()).bind(apply)
        log.info("serving", port=bound, services=services)
        if ready is not None:
            ready.set()

    became_ready = asyncio.create_task(mark_serving())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    became_ready.cancel()
    if health_state is not None:
        await health_state.bind(None)
    log.info("stopping")
    for svc in [*services, ""]:
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    if on_stop is not None:
        await on_stop()
    await server.stop(grace=3.0)
    log.info("stopped")


_GAUGE_SUFFIXES = ("l1_sessions", "run_streams", "lpids_in_use", "_p50", "_p99")


def start_metrics(port: int, service: str, counters: Callable[[], dict[str, int]], host: str = "0.0.0.0") -> int:
    """Serve Prometheus metrics for one service (prometheus-client, its own HTTP thread).

    Every counter of the service becomes ``nestmmu_<service>_events_total{event="..."}`` (the
    event names are a fixed, small set: no addresses or ids in labels); current-state values
    (sessions, streams, LPIDs, latency percentiles) are gauges ``nestmmu_<service>_<name>``.
    Returns the bound port.
    """
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector

    class _Collector(Collector):
        def collect(self) -> Any:
            for _ in range(3):  # the asyncio thread may be updating the dict: retry a copy
                try:
                    snapshot = dict(counters())
                    break
                except RuntimeError:
                    continue
            else:  # pragma: no cover
                return
            events = CounterMetricFamily(f"nestmmu_{service}_events", f"nestmmu {service} event counters", labels=["event"])
            for key, value in sorted(snapshot.items()):
                name = key.split(".", 1)[-1]
                if name.endswith(_GAUGE_SUFFIXES):
                    metric = name.replace(".", "_")
                    unit_fixed = metric.replace("_us_", "_seconds_") if "_us_" in metric else metric
                    scale = 1e-6 if "_us_" in metric else 1.0
                    yield GaugeMetricFamily(f"nestmmu_{service}_{unit_fixed}", f"nestmmu {service} {name}", value=value * scale)
                else:
                    events.add_metric([key], value)
            yield events

    REGISTRY.register(_Collector())
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
