"""Baselines for ``nestmmu bench``, measured in the same run as the figures they divide.

* ``grpc_unary_rtt_p50_us`` -- a plain gRPC unary echo between two processes: this process
  and a child running :func:`serve_echo` (a generic handler, no nestmmu code, no health or
  interceptors on the path), one 16-byte message at a time.
* ``grpc_bidi_rtt_p50_us`` -- the same over one bidi stream: write one message, read its echo.
  This is the floor for anything nestmmu does on its Connect and Run streams.
* ``dict_get_ns`` -- a plain ``dict.get`` in a Python loop (:mod:`nestmmu.bench_core`).

The echo server speaks raw bytes (identity serializers), so neither side pays for protobuf:
the baselines are the transport's own cost in this Python and grpcio.

    python -m nestmmu.bench_baselines --port PORT     # the echo server (the bench starts it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

SERVICE = "nestmmu.bench.v1.Echo"
_UNARY = f"/{SERVICE}/Unary"
_BIDI = f"/{SERVICE}/Bidi"
_PAYLOAD = b"0123456789abcdef"


def _identity(b: bytes) -> bytes:
    return b


async def serve_echo(port: int) -> None:
    """An echo server: Unary returns its request, Bidi echoes each message it reads."""

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_identity, response_serializer=_identity),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi, request_deserializer=_identity, response_serializer=_identity),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"bench echo: cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


@contextmanager
def echo_server() -> Iterator[str]:
    """Run the echo server in a child process; its address."""
    from nestmmu.cluster import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-P", "-m", "nestmmu.bench_baselines", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a wedged child
            proc.kill()
            proc.wait()


def _summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "p50": round(s[len(s) // 2], 1),
        "p99": round(s[min(len(s) - 1, len(s) * 99 // 100)], 1),
        "mean": round(statistics.fmean(s), 1),
        "n": len(s),
    }


async def echo_rtts_us(address: str, n: int) -> dict[str, dict[str, float]]:
    """Unary and bidi-stream echo round trips (µs) against ``address``, after a warm-up."""
    async with grpc.aio.insecure_channel(address) as ch:
        await asyncio.wait_for(ch.channel_ready(), 20)
        unary = ch.unary_unary(_UNARY, request_serializer=_identity, response_deserializer=_identity)
        bidi = ch.stream_stream(_BIDI, request_serializer=_identity, response_deserializer=_identity)
        u: list[float] = []
        for i in range(n + 50):
            t = time.perf_counter()
            got = await unary(_PAYLOAD, timeout=10)
            if i >= 50:
                u.append((time.perf_counter() - t) * 1e6)
            assert got == _PAYLOAD, "the echo server answered something else"
        call = bidi()
        b: list[float] = []
        for i in range(n + 50):
            t = time.perf_counter()
            await call.write(_PAYLOAD)
            echoed = await call.read()
            if i >= 50:
                b.append((time.perf_counter() - t) * 1e6)
            assert echoed == _PAYLOAD, "the echo stream answered something else"
        await call.done_writing()
    return {"unary_us": _summary(u), "bidi_us": _summary(b)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nestmmu.bench_baselines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="loopback port to serve the echo service on")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_echo(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
