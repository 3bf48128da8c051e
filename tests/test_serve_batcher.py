"""The batcher: requests waiting together share one forward pass, never beyond max_batch and never split;
each gets its own rows back; a failing forward pass fails exactly the requests in it."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from bincount.serve.batcher import Batcher


class Recorder:
    """A 'model' that returns its input rows, records each batch size, and holds its first call until
    released, so that the requests sent meanwhile queue up."""

    def __init__(self, fail_on: int | None = None):
        self.sizes: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sizes:
            self.started.set()
            self.release.wait(10)
        self.sizes.append(len(x))
        if self.fail_on is not None and len(self.sizes) - 1 == self.fail_on:
            raise RuntimeError("forward pass failed")
        return x * 1.0


async def held(recorder: Recorder) -> None:
    """Until the first request is inside the (held) forward pass."""
    for _ in range(1000):
        if recorder.started.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batcher never started a forward pass")


async def send_all(batcher: Batcher, recorder: Recorder, sizes: list[int]) -> list:
    first = asyncio.ensure_future(batcher(torch.full((1, 1), -1.0)))
    await held(recorder)
    rest = [asyncio.ensure_future(batcher(torch.full((n, 1), float(i)))) for i, n in enumerate(sizes)]
    await asyncio.sleep(0.05)
    recorder.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_waiting_requests_share_a_forward_pass():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=8)
    try:
        results = asyncio.run(send_all(batcher, recorder, [3, 2, 4, 1, 8]))
    finally:
        batcher.stop()
    assert recorder.sizes == [1, 5, 5, 8]  # 3+2 (4 would overflow), 4+1, then the full request alone
    assert results[0].tolist() == [[-1.0]]
    for i, (n, rows) in enumerate(zip([3, 2, 4, 1, 8], results[1:])):
        assert rows.tolist() == [[float(i)]] * n


def test_a_failed_forward_pass_fails_only_its_requests():
    recorder = Recorder(fail_on=1)
    batcher = Batcher(recorder, max_batch=4)
    try:
        results = asyncio.run(send_all(batcher, recorder, [2, 2, 3]))
    finally:
        batcher.stop()
    assert recorder.sizes == [1, 4, 3]
    assert [isinstance(r, RuntimeError) for r in results] == [False, True, True, False]
    assert results[3].tolist() == [[2.0]] * 3


def test_a_cancelled_request_is_skipped():
    recorder = Recorder()
    batcher = Batcher(recorder, max_batch=8)

    async def scenario():
        first = asyncio.ensure_future(batcher(torch.zeros(1, 1)))
        await held(recorder)
        gone = asyncio.ensure_future(batcher(torch.ones(5, 1)))
        kept = asyncio.ensure_future(batcher(torch.ones(2, 1)))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        recorder.release.set()
        await first
        return await kept

    try:
        assert asyncio.run(scenario()).tolist() == [[1.0], [1.0]]
    finally:
        batcher.stop()
    assert recorder.sizes == [1, 2]
