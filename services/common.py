"""What every nestmmu server shares: logging, request ids, health, reflection, errors, shutdown.

The servers are thin adapters over :mod:`nestmmu.core`; this module keeps the adapter code
that is not about any one level in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import signal
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

from .connection import CorruptRequestInterceptor, Health, ListenError, cannot_bind, server_options

REQUEST_ID_KEY = "x-request-id"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

#: Deadline for every RPC one level makes to another (seconds).
RPC_DEADLINE = 10.0
#: How long L0 waits for one vCPU to acknowledge an invalidation before disconnecting it.
BROADCAST_ACK_TIMEOUT = 2.0
#: How long L0 waits for its L1 to answer a walk, a memory access or an exit.
L1_CALL_TIMEOUT = 5.0


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


def metadata_with_request_id(rid: str | None = None) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, rid or request_id_var.get() or new_request_id()),)


def freeze_startup_heap() -> None:
    """Take the objects that exist once the server is up (modules, classes, descriptors,
    grpc and protobuf machinery: tens of thousands, alive until exit) out of the cyclic
    garbage collector's view.  A full collection runs on the event loop's thread whenever
    allocations trigger it, and walking them cost 25-45 ms per collection on a busy 2-core
    host (measured in the L2 service under max-size batches): enough to break the 100 ms
    health bound.  Later objects are collected as usual."""
    gc.collect()
    gc.freeze()


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
    problem = cannot_bind(host, port)  # ask the OS first: grpc would log its own error lines
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
    freeze_startup_heap()

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


_GAUGE_SUFFIXES: tuple[str, ...] = ("l1_sessions", "run_streams", "lpids_in_use", "_p50", "_p99", "_max")
# Current-state values of L0 (services/l0/inspect.py counters): they go down, so gauges.
_GAUGE_SUFFIXES += ("run_tokens", "nested_guests", "shadow_leaves", "host_blocks", "nest_rmap_entries", "nest_rmap_live", "nest_rmap_stale")


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
