"""Requests that arrive together share a forward pass.

One thread owns the model. Whenever it is free it takes every request waiting in the queue, up to
`max_batch` images, and runs them as one batch: a lone request never waits for company (no timer, so no
added latency at low load), while under load the batches grow by themselves. A request is never split.
Only this thread runs the model, so concurrent requests never fight over the cores.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

_STOP = object()


class Batcher:
    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], max_batch: int):
        self._run = run
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="bincount-batcher", daemon=True)
        self._thread.start()

    async def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The model's output rows for `images` (a batch of at most `max_batch`)."""
        future: Future = Future()
        self._queue.put((images, future))
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        carried = None
        while True:
            item = carried or self._queue.get()
            carried = None
            if item is _STOP:
                return
            batch, size = [item], len(item[0])
            while size < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP or size + len(item[0]) > self._max_batch:
                    carried = item
                    break
                batch.append(item)
                size += len(item[0])
            self._forward(batch)

    def _forward(self, batch: list[tuple[torch.Tensor, Future]]) -> None:
        batch = [(images, future) for images, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            out = self._run(torch.cat([images for images, _ in batch]))
        except Exception as e:
            for _, future in batch:
                future.set_exception(e)
            return
        for rows, (_, future) in zip(out.split([len(images) for images, _ in batch]), batch):
            future.set_result(rows)
