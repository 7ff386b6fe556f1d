"""AsyncDriver: the asyncio side of LLM, in the same process and thread.

One engine-loop task per event loop, started lazily by the first stream (and again by
``resume``/``wake_up`` or any later stream), steps the engine while any request is
unfinished and the engine is neither paused nor asleep, yielding to the loop between steps
so coroutines can submit, abort and consume; then it ends until work comes again. A step
runs on the loop's thread (the engine is single-threaded and needs no locks), so a step
holds the loop for its duration; coroutines run between steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from rollout.entrypoints.frontend import RequestFrontend, Submission
from rollout.outputs import RequestOutput

logger = logging.getLogger(__name__)


class AsyncDriver:
    def __init__(self, frontend: RequestFrontend) -> None:
        self._frontend = frontend
        self._task: asyncio.Task | None = None

    def kick(self) -> None:
        """Start the engine loop on the running event loop unless it runs already (no-op
        outside a running loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = self._task
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._task = loop.create_task(self._loop(), name="rollout-engine-loop")

    async def _loop(self) -> None:
        frontend = self._frontend
        try:
            while frontend.can_step():
                frontend.step()
                await asyncio.sleep(0)  # let coroutines submit, abort and consume
        except Exception:  # already delivered to every waiting consumer by step()
            logger.exception("engine loop stopped by a failed step")

    async def stream(self, sub: Submission) -> AsyncIterator[RequestOutput]:
        """Queue ``sub`` on first iteration and yield its outputs up to the final one; a
        stream closed or cancelled before that aborts its request."""
        queue: asyncio.Queue = asyncio.Queue()
        sink = queue.put_nowait
        request_id, _ = self._frontend.submit(sub, sink)
        finished = False
        try:
            self.kick()
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:  # NaN/inf logits: this stream fails, the others go on
                    raise item.error
                yield item
        finally:
            if not finished:
                self._frontend.abort_quietly(request_id, sink)
