"""The replica's dynamic batcher: batches form while the model is busy; each caller gets its own result."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.batching import Batcher


def run(coro):
    return asyncio.run(coro)


async def echo_batches(calls: list[list[int]], delay_s: float = 0.05):
    async def run_batch(items, waited):
        calls.append(list(items))
        await asyncio.sleep(delay_s)  # the model is busy: others queue meanwhile
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    return run_batch


def test_requests_arriving_while_a_batch_runs_form_the_next_batch():
    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls), max_batch_size=16, wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch is running
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 10)]
        results = await asyncio.gather(first, *rest)
        return calls, results

    calls, results = run(main())
    assert results == [i * 10 for i in range(10)]
    assert calls == [[0], list(range(1, 10))]  # nine callers, one batch: not nine batches of one


def test_batches_respect_the_maximum_size():
    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.01), max_batch_size=4, wait_timeout_s=0.0)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        return calls, results

    calls, results = run(main())
    assert results == [i * 10 for i in range(10)]
    assert max(len(c) for c in calls) <= 4 and sum(len(c) for c in calls) == 10


def test_a_lone_request_waits_briefly_for_company():
    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.0), max_batch_size=8, wait_timeout_s=0.2)
        await asyncio.gather(batcher.submit(0), batcher.submit(0))  # callers seen together: waits pay
        a = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.02)
        b = asyncio.create_task(batcher.submit(2))
        return calls, await asyncio.gather(a, b)

    calls, results = run(main())
    assert results == [10, 20] and calls == [[0, 0], [1, 2]]


def test_an_error_reaches_only_its_caller():
    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.0), max_batch_size=8, wait_timeout_s=0.01)
        return await asyncio.gather(batcher.submit(1), batcher.submit(-1), return_exceptions=True)

    good, bad = run(main())
    assert good == 10 and isinstance(bad, ValueError) and str(bad) == "bad -1"


def test_a_cancelled_caller_is_dropped_and_the_batcher_goes_on():
    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.05), max_batch_size=8, wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        stays = asyncio.create_task(batcher.submit(3))
        return calls, await first, await stays

    calls, first, stays = run(main())
    assert (first, stays) == (10, 30)
    assert [2] not in calls and all(2 not in c for c in calls)


def test_the_wait_of_each_request_is_reported():
    async def main():
        seen: list[list[int]] = []

        async def run_batch(items, waited):
            seen.append(waited)
            await asyncio.sleep(0.03)
            return items

        batcher = Batcher(run_batch, max_batch_size=8, wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.005)
        await asyncio.gather(first, batcher.submit(2))
        return seen

    seen = run(main())
    assert seen[1][0] > 0  # the second request queued behind the first batch


def test_a_zero_max_is_refused():
    with pytest.raises(ValueError):
        Batcher(lambda items, waited: items, max_batch_size=0, wait_timeout_s=0)


def test_submit_many_returns_results_in_order_with_errors_as_values_and_never_waits():
    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.0), max_batch_size=3, wait_timeout_s=5.0)
        started = asyncio.get_running_loop().time()
        results = await batcher.submit_many([1, -2, 3, 4])
        return calls, results, asyncio.get_running_loop().time() - started

    calls, results, took = run(main())
    assert results[0] == 10 and isinstance(results[1], ValueError) and results[2:] == [30, 40]
    assert calls == [[1, -2, 3], [4]]  # already a batch: split at the maximum, no 5 s wait for company
    assert took < 2.5


def test_submitted_batches_merge_with_other_callers_in_the_queue():
    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.05), max_batch_size=16, wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the model is busy with [0]
        a = asyncio.create_task(batcher.submit_many([1, 2, 3]))  # one ingress's batch
        b = asyncio.create_task(batcher.submit_many([4, 5]))  # another's
        c = asyncio.create_task(batcher.submit(6))
        return calls, await asyncio.gather(first, a, b, c)

    calls, (r0, ra, rb, rc) = run(main())
    assert (r0, ra, rb, rc) == (0, [10, 20, 30], [40, 50], 60)
    assert calls == [[0], [1, 2, 3, 4, 5, 6]]


def test_concurrency_runs_that_many_batches_at_once_and_no_more():
    async def main():
        running = peak = 0
        calls: list[list[int]] = []

        async def run_batch(items, waited):
            nonlocal running, peak
            calls.append(list(items))
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.03)
            running -= 1
            return [i * 10 for i in items]

        batcher = Batcher(run_batch, max_batch_size=2, wait_timeout_s=0.0, concurrency=3)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(12)))
        return calls, results, peak

    calls, results, peak = run(main())
    assert results == [i * 10 for i in range(12)]
    assert peak == 3
    assert sorted(i for c in calls for i in c) == list(range(12)) and max(len(c) for c in calls) <= 2


def test_invalid_batcher_settings_are_refused():
    with pytest.raises(ValueError, match="concurrency"):
        Batcher(lambda items, waited: None, max_batch_size=2, wait_timeout_s=0.0, concurrency=0)


def test_one_caller_at_a_time_pays_no_wait_but_a_probe_and_company_turns_it_back_on(monkeypatch):
    """A closed loop of one client never brings company (its next request waits for this answer). From a start,
    lone requests run at once; while the traffic goes on, one lone request per PROBE_INTERVAL_S waits to see
    whether company comes; callers that arrive together turn the wait back on; an idle spell turns it off again."""
    import serving.batching as batching

    monkeypatch.setattr(batching, "PROBE_INTERVAL_S", 0.5)

    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.0), max_batch_size=8, wait_timeout_s=0.1)
        loop = asyncio.get_running_loop()

        async def one(i):
            started = loop.time()
            assert await batcher.submit(i) == i * 10
            return loop.time() - started

        took = []
        started = loop.time()
        while loop.time() - started < 1.2:  # one client, one request after the other, for 1.2 s
            took.append(await one(1))
            await asyncio.sleep(0.01)
        # two callers together: the second is queued when the batch forms, so the wait pays again
        await asyncio.gather(batcher.submit(8), batcher.submit(9))
        back_on = await one(10)
        await asyncio.sleep(0.6)  # an idle spell: the first request after it has nobody on the way
        after_idle = await one(11)
        return calls, took, back_on, after_idle

    calls, took, back_on, after_idle = run(main())
    waited = [t for t in took if t >= 0.09]
    assert all(t < 0.05 for t in took[:5]), took  # from the start: no wait
    assert 1 <= len(waited) <= 2, took  # a probe each 0.5 s of traffic (after the first 0.5 s)
    assert len(took) - len(waited) >= 20
    assert [8, 9] in calls
    assert back_on >= 0.09  # company seen: a lone request waits for it again
    assert after_idle < 0.05


def test_a_wait_that_finds_company_keeps_the_wait_on():
    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.0), max_batch_size=8, wait_timeout_s=0.1)
        await asyncio.gather(batcher.submit(100), batcher.submit(101))  # callers seen together: waits pay
        for i in range(5):  # each lone request is joined by a second one 20 ms later
            a = asyncio.create_task(batcher.submit(2 * i))
            await asyncio.sleep(0.02)
            await asyncio.gather(a, batcher.submit(2 * i + 1))
        return calls

    assert run(main()) == [[100, 101]] + [[2 * i, 2 * i + 1] for i in range(5)]


def test_a_few_stragglers_wait_for_the_rest_of_a_recent_batch():
    """After a batch of 9, two requests that find the model free wait (up to the timeout) for the rest of such a
    batch instead of running as a batch of two: in a closed loop the others are on their way back."""

    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.0), max_batch_size=16, wait_timeout_s=0.2)
        await asyncio.gather(*(batcher.submit(i) for i in range(9)))  # one batch of 9
        two = [asyncio.create_task(batcher.submit(i)) for i in (10, 11)]
        await asyncio.sleep(0.03)
        six = [asyncio.create_task(batcher.submit(i)) for i in range(12, 18)]
        await asyncio.gather(*two, *six)
        # more than half of the recent batch is ready: it goes at once, no wait
        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(batcher.submit(i) for i in range(20, 25)))
        return calls, asyncio.get_running_loop().time() - started

    calls, took = run(main())
    assert calls[0] == list(range(9))
    assert calls[1] == [10, 11, *range(12, 18)]
    assert calls[2] == list(range(20, 25)) and took < 0.15


def test_short_batches_run_on_the_loop_and_long_ones_on_a_thread():
    """LoopOrThread: the first batch (unknown length) on a worker thread; then, while batches take less than
    `below_s` on average, on the event loop's own thread; a slow one moves the next ones back to a thread, and so
    does a model lock held by another caller (the loop must never wait for it)."""
    import threading

    from serving.batching import LoopOrThread

    held = threading.Event()
    placement = LoopOrThread(0.05, busy=held.is_set)
    where: list[str] = []

    def batch(seconds: float) -> str:
        time.sleep(seconds)
        where.append("loop" if threading.current_thread() is threading.main_thread() else "thread")
        return "done"

    async def scenario() -> None:
        assert await placement.run(batch, 0.001) == "done"  # unknown: a thread
        for _ in range(3):
            await placement.run(batch, 0.001)  # short: the loop
        await placement.run(batch, 0.3)  # still on the loop (the average was short), and slow
        await placement.run(batch, 0.001)  # the average is long now: a thread
        held.set()
        placement.average_s = 0.0
        await placement.run(batch, 0.001)  # another caller holds the model: a thread
        held.clear()
        await placement.run(batch, 0.001)

    asyncio.run(scenario())
    assert where == ["thread", "loop", "loop", "loop", "loop", "thread", "thread", "loop"]
    assert placement.on_loop == 5
    seeded = LoopOrThread(0.05)
    seeded.average_s = 0.001  # a replica's, from its warm-up's batch (serving/deployment.py): known at once
    where.clear()
    asyncio.run(seeded.run(batch, 0.0))
    assert where == ["loop"]
    never = LoopOrThread(0.0)  # 0: always a thread
    where.clear()
    asyncio.run(never.run(batch, 0.0))
    asyncio.run(never.run(batch, 0.0))
    assert where == ["thread", "thread"]


def test_a_lone_request_waits_for_as_many_as_the_recent_batches_not_for_a_full_one():
    """Eight closed-loop callers of a batcher of 16: the first to come back waits for the other seven (the recent
    batches' size) and goes once they are there, not for a ninth that never comes (a wait that lasted the whole
    timeout every time). Once more come, the batches grow: whatever is queued joins."""

    async def main():
        calls: list[list[int]] = []
        batcher = Batcher(await echo_batches(calls, 0.0), max_batch_size=16, wait_timeout_s=5.0)
        await asyncio.gather(*(batcher.submit(i) for i in range(8)))  # one batch of 8
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(batcher.submit(100))  # alone: it waits for company
        await asyncio.sleep(0.02)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(101, 108)]
        await asyncio.gather(first, *rest)
        took = loop.time() - started
        # more callers now: one alone waits for 8, and the four queued behind them join the same batch
        more = [asyncio.create_task(batcher.submit(i)) for i in range(200, 212)]
        await asyncio.gather(*more)
        return calls, took

    calls, took = run(main())
    assert calls[1] == list(range(100, 108))
    assert took < 2.5  # not the 5 s timeout
    assert calls[2] == list(range(200, 212))
