"""The L2's health follows the L0s it needs: grpc.health.v1 Watch streams, one per L0.

An L2 whose vCPUs cannot reach any L0 cannot run a workload, so it should not say SERVING.
Each watched L0 has one long-lived Health.Watch stream (the standard health protocol, on a
channel with the project's keepalive policy, so a silent L0 is noticed within the keepalive
bound); a broken stream counts as "not serving" and is reopened with a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..connection import insecure_channel

log = structlog.get_logger("l2.health")

#: Reconnect backoff of a broken Watch stream: first delay and ceiling (seconds).
WATCH_BACKOFF_START = 0.1
WATCH_BACKOFF_MAX = 1.0


class L0Watch:
    """Watches the health of a set of L0 addresses; reports "some L0 is SERVING" on change.

    With no address known yet, it reports nothing (the service keeps its initial state).
    """

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self.on_change = on_change
        self.status: dict[str, bool] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last: bool | None = None

    @property
    def serving(self) -> bool:
        return any(self.status.values())

    def add(self, address: str) -> None:
        """Start watching ``address`` (idempotent)."""
        if address in self._tasks:
            return
        self._tasks[address] = asyncio.get_running_loop().create_task(self._watch(address), name=f"l0-watch-{address}")

    async def stop(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        for t in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _set(self, address: str, serving: bool) -> None:
        if self.status.get(address) != serving:
            log.info("l0_health", l0=address, serving=serving)
        self.status[address] = serving
        now = self.serving
        if now != self._last:
            self._last = now
            self.on_change(now)

    async def _watch(self, address: str) -> None:
        delay = WATCH_BACKOFF_START
        while True:
            try:
                async with insecure_channel(address) as channel:
                    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                    async for resp in call:
                        self._set(address, resp.status == health_pb2.HealthCheckResponse.SERVING)
                        delay = WATCH_BACKOFF_START
            except grpc.aio.AioRpcError as e:
                log.debug("l0_watch_broken", l0=address, code=e.code().name)
            self._set(address, False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_BACKOFF_MAX)
