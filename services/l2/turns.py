"""Fair sharing of the L2 process's event loop between scanning vCPUs and RPCs.

Every vCPU of this process scans its batches on the one event loop that also serves
L2Service and health.  A unary RPC needs several loop iterations (request, handler, response,
completion); if every scanning vCPU ran a slice in each of those iterations, a probe would wait
for vCPUs x slices x iterations.  :class:`SliceTurns` hands out one scan turn per loop
iteration across all vCPUs, so an RPC waits for at most one slice per iteration whatever the
number of busy vCPUs (issue 6's responsiveness bound).  The order is first come, first served,
so no vCPU starves; which vCPU scans when changes no result (each has its own TLB).
"""

from __future__ import annotations

import asyncio
from collections import deque


class SliceTurns:
    """One scan slice per event-loop iteration, handed to waiting vCPUs in arrival order."""

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._scheduled = False

    async def take(self) -> None:
        """Wait for this vCPU's turn: it may then scan one slice before it awaits anything."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiting.append(fut)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._grant, loop)
        await fut

    def _grant(self, loop: asyncio.AbstractEventLoop) -> None:
        # The woken task runs in the next iteration, and so does the next grant: I/O is polled
        # (and ready RPC callbacks run) between any two slices.
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():  # a cancelled vCPU gave up its place
                fut.set_result(None)
                break
        if self._waiting:
            loop.call_soon(self._grant, loop)
        else:
            self._scheduled = False


#: The turns of this process's event loop (the L2 service runs one loop).
TURNS = SliceTurns()

__all__ = ["TURNS", "SliceTurns"]
