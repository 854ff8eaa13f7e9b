"""The ingress's door (``serve_app.deployments.ingress.door``) on its own: no HTTP, no cluster."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import pytest

from serve_app.api.http import arrival_offset_s
from serve_app.config import load_config
from serve_app.core.backend import Overloaded
from serve_app.core.peer_clocks import MAX_PEERS
from serve_app.core.timing import UNTIMED, ModelTiming, Processor
from serve_app.deployments.ingress.arrival_clock import ArrivalClock
from serve_app.deployments.ingress.door import INITIAL_TOKENS_PER_BYTE, PER_BYTE_SMOOTHING, Door
from serve_app.deployments.ingress.tokenizer_threads import INLINE_TOKENIZE_CHARS
from serve_app.deployments.ingress.trace import Trace


def _door(max_queue_wait_s: float | None = None) -> Door:
    """A door with the default config's batching (budget 0.15 s), or this budget."""
    batching = load_config().batching
    if max_queue_wait_s is not None:
        batching = batching.model_copy(update={"max_queue_wait_s": max_queue_wait_s})
    door = Door()
    door.configure(batching)
    return door


@dataclass(frozen=True)
class _Answer:
    """A model's answer as the door sees it (``Ranked``, ``Classified``): a value and its timing."""

    value: object
    timing: ModelTiming = UNTIMED


async def _answer() -> _Answer:
    return _Answer("answer")


def test_a_route_learns_its_tokens_per_body_byte_from_its_model_calls() -> None:
    door, route = _door(), "/v1/rerank"
    first = Trace(route=route)
    door.admit(1000, first, "rerank")
    assert first.models_held == {"rerank": int(1000 * INITIAL_TOKENS_PER_BYTE)}  # nothing learned yet
    assert asyncio.run(door.call("rerank", 200, _answer, first)).value == "answer"  # it cost 0.2 tokens a byte
    second = Trace(route=route)
    door.admit(1000, second, "rerank")
    assert second.models_held["rerank"] == 200  # the first sample is taken whole
    asyncio.run(door.call("rerank", 400, _answer, second))  # 0.4 a byte: a moving average moves toward it
    third = Trace(route=route)
    door.admit(1000, third, "rerank")
    assert third.models_held["rerank"] == int(1000 * (0.2 + PER_BYTE_SMOOTHING * (0.4 - 0.2)))
    other = Trace(route="/v1/classify")
    door.admit(1000, other, "rerank")
    assert other.models_held["rerank"] == int(1000 * INITIAL_TOKENS_PER_BYTE)  # per route
    for t in (third, other):
        door.release(t)
    assert door.models["rerank"].queued_tokens == 0 and door.tokenizer.queued_tokens == 0


def test_only_a_body_long_enough_for_the_threads_joins_their_queue() -> None:
    door = _door()
    short, long_ = Trace(route="/r"), Trace(route="/r")
    door.admit(INLINE_TOKENIZE_CHARS, short, "classify")  # tokenized on the event loop
    door.admit(INLINE_TOKENIZE_CHARS + 1, long_, "classify")
    assert short.tokenizer_held == 0 and long_.tokenizer_held == INLINE_TOKENIZE_CHARS + 1
    door.measured(long_, 1234)  # parsed: it holds its length in characters now, not its byte estimate
    assert door.tokenizer.queued_tokens == long_.tokenizer_held == 1234
    assert door.chars_per_byte("/r") == pytest.approx(1234 / (INLINE_TOKENIZE_CHARS + 1))
    door.release(long_)
    door.release(short)
    assert door.tokenizer.queued_tokens == 0 and door.models["classify"].queued_tokens == 0


def test_a_call_not_admitted_at_the_door_is_checked_before_it_is_sent() -> None:
    """A shadow's call has no reservation from the door: over the budget it is refused, and never made."""
    door = _door()
    adm = door.models["rerank"]
    adm.observe(1000, started=0.0, now=1.0)  # 1,000 padded tokens a second
    adm.reserve(500)  # 0.5 s queued
    made: list[int] = []

    async def model() -> _Answer:
        made.append(1)
        return _Answer(1)

    with pytest.raises(Overloaded):
        asyncio.run(door.call("rerank", 10, model, Trace(route="/r")))
    assert made == [] and adm.queued_tokens == 500
    adm.release(500)
    assert asyncio.run(door.call("rerank", 10, model, Trace(route="/r"))).value == 1
    assert adm.queued_tokens == 0


def test_the_budget_covers_the_wait_before_the_door() -> None:
    """A request that waited before the ingress's handler ran (HAProxy's stamp) has that much less of the budget
    left: with an empty queue it is refused once it waited longer than the whole budget, and admitted before."""
    door = _door(max_queue_wait_s=0.25)
    adm = door.models["classify"]
    door.admit(100, Trace(route="/c"), "classify", waited_s=0.2)
    with pytest.raises(Overloaded) as refused:
        door.admit(100, Trace(route="/c"), "classify", waited_s=0.3)
    assert refused.value.expected_wait_s == pytest.approx(0.3)
    assert (adm.arrivals, adm.refused) == (2, 1)
    assert adm.arrival_wait_max_s == pytest.approx(0.3)
    assert adm.as_dict()["arrival_wait_max_ms"] == 300.0
    adm.rate_tokens_per_s, adm.queued_tokens = 1000.0, 100  # 0.1 s queued: 0.2 s before the door is too much now
    with pytest.raises(Overloaded):
        door.admit(100, Trace(route="/c"), "classify", waited_s=0.2)
    door.admit(100, Trace(route="/c"), "classify", waited_s=0.1)
    door.admit(100, Trace(route="/c"), "classify", waited_s=0.03)
    door.admit(100, Trace(route="/c"), "classify", waited_s=0.001)
    seen = adm.as_dict()  # waits of 200, 300, 200, 100, 30 and 1 ms, counted at 20, 50 and 100 ms
    assert (seen["arrivals_over_20ms"], seen["arrivals_over_50ms"], seen["arrivals_over_100ms"]) == (5, 4, 4)


def test_a_stamp_that_is_not_haproxys_counts_for_nothing() -> None:
    now = 1_800_000_000.0
    assert arrival_offset_s(str(int((now - 0.0125) * 1e6)), now) == pytest.approx(0.0125, abs=1e-6)
    assert arrival_offset_s(str(int((now + 0.002) * 1e6)), now) == pytest.approx(-0.002, abs=1e-6)  # a clock ahead
    for stamp in (None, "", "-5", "1.5e9", "abc", str(int((now + 61) * 1e6)), "1"):  # absent, forged, far off
        assert arrival_offset_s(stamp, now) is None, stamp
    clock = ArrivalClock()
    assert clock.wait_s("10.0.0.1", "1", now) == 0.0 and clock.bases_ms() == {}
    for k in range(MAX_PEERS + 5):  # the table of peers has a bound: a peer beyond it counts for nothing
        clock.wait_s(f"peer-{k}", _stamp(now - 1.0), now)
        wait = clock.wait_s(f"peer-{k}", _stamp(now - 1.0), now + 0.5)
        assert wait == (pytest.approx(0.5, abs=1e-5) if k < MAX_PEERS else 0.0)
    assert len(clock.bases_ms()) == MAX_PEERS


def _stamp(at_s: float) -> str:
    return str(int(at_s * 1e6))


@pytest.mark.parametrize("skew_s", [-2.0, 0.0, 0.3])  # the stamping node's clock behind, with ours, ahead
def test_the_wait_before_the_door_is_read_without_trusting_the_clocks_to_agree(skew_s: float) -> None:
    """HAProxy stamps by its node's clock and the ingress reads by its own: the least offset seen from a peer
    is its base, and a request's wait is what it adds to that. A clock 2 s behind would otherwise make every
    request look 2 s old, and the door refuse them all."""
    clock, door, now = ArrivalClock(), _door(), 1_800_000_000.0
    peer = "10.0.0.7"
    for sent, waited in ((0.0, 0.0004), (0.05, 0.0012), (0.1, 0.0004), (0.15, 0.0304), (0.2, 0.0904)):
        arrived = now + sent + waited
        wait = clock.wait_s(peer, _stamp(now + sent + skew_s), arrived)
        door.admit(100, Trace(route="/c"), "classify", waited_s=wait)  # none refused (budget 0.15 s)
    assert wait == pytest.approx(0.09, abs=1e-5)  # the last: 90 ms more than the least seen
    assert clock.bases_ms()[peer] == pytest.approx((-skew_s + 0.0004) * 1000, abs=0.01)
    adm = door.models["classify"]
    assert (adm.arrivals, adm.refused, adm.arrivals_over[20], adm.arrivals_over[50]) == (5, 0, 2, 1)


def test_each_haproxy_has_its_own_base_and_a_clock_that_steps_is_followed() -> None:
    """A stamping clock that steps ahead (its requests look younger) is the new base at once; one that steps
    back (they look older) is followed once the old base has left the window."""
    clock, now = ArrivalClock(window_s=10.0), 1_800_000_000.0
    clock.wait_s("a", _stamp(now - 1.0), now)  # a's clock 1 s behind ours
    clock.wait_s("b", _stamp(now + 0.5), now)  # b's 0.5 s ahead
    assert clock.wait_s("a", _stamp(now + 1 - 1.0), now + 1.02) == pytest.approx(0.02, abs=1e-5)
    assert clock.wait_s("b", _stamp(now + 1 + 0.5), now + 1.02) == pytest.approx(0.02, abs=1e-5)
    t = now + 2.0  # a is set right: 0.8 s ahead of where it was
    assert clock.wait_s("a", _stamp(t - 0.2), t) == 0.0
    assert clock.wait_s("a", _stamp(t + 0.1 - 0.2), t + 0.13) == pytest.approx(0.03, abs=1e-5)
    assert clock.bases_ms() == {"a": pytest.approx(200.0, abs=0.01), "b": pytest.approx(-500.0, abs=0.01)}
    t = now + 3.0  # a steps back 0.5 s: its requests look 0.5 s older than they are, until the window passes
    assert clock.wait_s("a", _stamp(t - 0.7), t) == pytest.approx(0.5, abs=1e-5)
    for k in range(1, 3):  # one request every 5 s, each 1 ms on its way
        clock.wait_s("a", _stamp(t + 5 * k - 0.7), t + 5 * k + 0.001)
    assert clock.bases_ms()["a"] == pytest.approx(701.0, abs=0.01)
    assert clock.wait_s("a", _stamp(t + 11 - 0.7), t + 11.031) == pytest.approx(0.03, abs=1e-5)


@pytest.mark.parametrize(("ratio", "judged"), [(0.25, True), (0.5, False)])
def test_the_refused_to_admitted_ratio_that_judges_an_overload_is_the_configs(ratio: float, judged: bool) -> None:
    """12 refused against 40 admitted (at once, so nothing decays): an overload at 0.25, not at 0.5."""
    batching = load_config().batching.model_copy(
        update={"overload_queue_wait_s": 0.02, "overload_start_within_s": 0.02, "overload_refused_ratio": ratio}
    )
    door = Door()
    door.configure(batching)
    rerank = door.models["rerank"]
    for _ in range(40):
        rerank.reserve(100)
    for _ in range(12):
        with pytest.raises(Overloaded):
            rerank.refuse(1.0)
    assert rerank.overloaded() is judged
    assert rerank.holds_start_by() is judged
    assert rerank.budget_s() == (0.02 if judged else batching.max_queue_wait_s)


def test_an_answer_computed_on_the_cpu_turns_the_overload_budgets_off_for_a_while() -> None:
    """One answer from the CPU (a replica on the fallback chain's last link) is enough, however many come from a
    GPU meanwhile; an answer that says nothing (from a cache) changes nothing; the budgets hold again once the
    latest answer came from a GPU and none from the CPU for ``cpu_answer_hold_s``."""
    budgets = {"overload_queue_wait_s": 0.02, "overload_start_within_s": 0.02}
    batching = load_config().batching.model_copy(update=budgets)
    door = Door()
    door.configure(batching)
    rerank, trace = door.models["rerank"], Trace(route="/r")
    door.admit(100, trace, "rerank")
    for _ in range(12):  # 12 refused against 1 admitted: an overload
        with pytest.raises(Overloaded):
            rerank.refuse(1.0)
    assert rerank.overloaded() and rerank.budget_s() == 0.02 and door.start_by("rerank", trace)[1]

    def answered(processor: Processor | None) -> None:
        async def model() -> _Answer:
            return _Answer(0, ModelTiming(processor=processor))

        asyncio.run(door.call("rerank", 10, model, Trace(route="/r")))

    for processor in (None, Processor.GPU):
        answered(processor)
        assert rerank.judges_overload() and rerank.budget_s() == 0.02
    answered(Processor.CPU)
    answered(Processor.GPU)
    assert not rerank.judges_overload() and not rerank.holds_start_by()
    assert rerank.budget_s() == batching.max_queue_wait_s and door.start_by("rerank", trace) == (math.inf, False)
    assert rerank.as_dict()["overload_budgets_on"] is False
    assert door.models["classify"].judges_overload()  # the other model's answers are its own
    rerank.computed_on(Processor.CPU, now=time.monotonic() - rerank.cpu_answer_hold_s - 0.01)  # long ago, and
    assert not rerank.judges_overload()  # the latest: however long ago, it keeps them off
    rerank.computed_on(Processor.GPU)
    assert rerank.judges_overload() and door.start_by("rerank", trace)[0] == trace.arrived + 0.02
