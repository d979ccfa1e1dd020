"""Connection health for every nestmmu server and client: one keepalive policy, health that
services flip, a guard that answers unparsable request bytes INVALID_ARGUMENT, listening.

See docs/design-notes.md, "Connection health", for the values and the bounds they give.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# ---------------------------------------------------------------- connection health
# One keepalive policy for every server and every client channel (grpc doc/keepalive.md):
# a client may ping no more often than the server accepts, or the server answers GOAWAY
# "too_many_pings" and every stream on that connection (an L1's Connect, a vCPU's Run) ends.
#: Clients ping an idle connection every CLIENT_KEEPALIVE_MS and drop it when the ack has
#: not come within KEEPALIVE_TIMEOUT_MS: a dead or wedged server is noticed within 30 s.
#: The timeout is longer than every application-level timeout (an L1 call 5 s, a tlbsync ack
#: 2 s): a peer that is only paused for a few seconds (a SIGSTOPped L1, a busy machine) gets
#: the architectural outcome (a failed walk, an inconclusive audit) and keeps its session;
#: with 5 s, any ping sent while an L1 was paused (grpc also pings with data) ended its
#: session 5 s later and L0 released every guest of an L1 that was merely paused.
CLIENT_KEEPALIVE_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 20_000
#: Servers accept client pings as often as every SERVER_MIN_PING_INTERVAL_MS (half the client
#: interval: a ping delayed by a busy event loop followed by a punctual one is not a strike).
SERVER_MIN_PING_INTERVAL_MS = 5_000
#: Servers ping idle clients (a vCPU or L1 that vanished without a FIN) every
#: SERVER_KEEPALIVE_MS: a dead client is noticed within 20 s + 20 s.
SERVER_KEEPALIVE_MS = 20_000
# grpcio 1.85 closes a transport whose ping went unanswered after grpc.http2.ping_timeout_ms
# (default 60 s), not after keepalive_timeout_ms alone: both are set to KEEPALIVE_TIMEOUT_MS
# (measured: a SIGSTOPped L0 is noticed by L1 and L2 after 29.4 s with it, bound 30 s).
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
            from .common import bad_request  # common imports this module

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


def cannot_bind(host: str, port: int) -> str | None:
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
