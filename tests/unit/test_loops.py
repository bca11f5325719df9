"""agentwatch.core.loops: within() (the servers' per-request timeout)."""
import asyncio

import pytest

from agentwatch.core.loops import within


def test_within_passes_the_result_and_times_out_as_asyncio_timeouterror():
    async def go():
        assert await within(asyncio.sleep(0, "x"), 1) == "x"
        with pytest.raises(asyncio.TimeoutError):
            await within(asyncio.sleep(5), 0.05)
        # the timed-out wait left the task usable: no stray cancellation
        await asyncio.sleep(0.01)
        return "done"
    assert asyncio.run(go()) == "done"


def test_within_lets_a_real_cancellation_through():
    async def go():
        task = asyncio.ensure_future(within(asyncio.sleep(5), 10))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(go())
