"""to_completion: a step that must end once begun, whoever stops waiting for it."""

from __future__ import annotations

import asyncio

import pytest

from agentvm.common.completion import to_completion


def test_a_cancelled_caller_waits_for_the_step_then_sees_its_cancellation() -> None:
    ended: list[str] = []

    async def step() -> str:
        await asyncio.sleep(0.2)
        ended.append("step")
        return "done"

    async def main() -> None:
        caller = asyncio.ensure_future(to_completion(step()))
        await asyncio.sleep(0.05)
        caller.cancel()
        await asyncio.sleep(0.01)
        caller.cancel()  # however often: a client gone, then SIGTERM
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert ended == ["step"]  # it ran to its end before the caller saw the cancel

    asyncio.run(main())


def test_result_and_error_pass_through() -> None:
    async def fails() -> None:
        raise ValueError("the step's own error")

    async def main() -> None:
        assert await to_completion(asyncio.sleep(0, "x")) == "x"
        with pytest.raises(ValueError, match="own error"):
            await to_completion(fails())

    asyncio.run(main())


def test_a_thread_is_waited_for() -> None:
    import threading

    gate = threading.Event()
    done: list[int] = []

    def work() -> int:
        gate.wait(5)
        done.append(1)
        return 1

    async def main() -> None:
        caller = asyncio.ensure_future(to_completion(asyncio.to_thread(work)))
        await asyncio.sleep(0.05)
        caller.cancel()
        await asyncio.sleep(0.05)
        assert not caller.done()  # still waiting for the thread
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert done == [1]

    asyncio.run(main())
