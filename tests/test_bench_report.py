"""The benchmark's reading of the service's ``Server-Timing`` (no cluster): the stage means it reports over all
accepted requests and over the slowest share, and what it leaves outside the service; and its overload
figure, the share within the bar, for the overload's first second and after it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench import stage_breakdown, within_bar

from serve_app.api.timing import RequestTiming, parse_server_timing
from serve_app.core.timing import ModelTiming


def header(queue_ms: float, total_ms: float) -> str:
    timing = RequestTiming(wait_s=0.001, tokenize_s=0.002, model_call_s=(queue_ms + 5) / 1000)
    timing.replied(ModelTiming(queue_s=queue_ms / 1000, inference_s=0.004, in_replica_s=(queue_ms + 4.5) / 1000))
    return dict(timing.raw_headers(total_ms / 1000))[b"server-timing"].decode()


def test_the_slowest_share_is_read_from_the_slowest_requests_and_the_rest_is_outside() -> None:
    # 99 quick requests and one slow one, whose time went to the model replica's queue
    accepted = [(0.020, header(1.0, 15.0)) for _ in range(99)] + [(0.200, header(150.0, 190.0))]
    accepted.append((0.010, ""))  # an answer without the header (a baseline) is left out
    report = stage_breakdown(accepted)
    slow = report["slowest_1%"]
    assert slow["queue"] == pytest.approx(150.0) and slow["total"] == pytest.approx(190.0)
    assert slow["outside"] == pytest.approx(200.0 - 190.0 - 1.0)  # the client's time beyond wait + total
    assert report["all"]["queue"] == pytest.approx((99 * 1.0 + 150.0) / 100)
    assert report["all"]["client_ms"] == pytest.approx((99 * 20.0 + 200.0) / 100)
    assert stage_breakdown([(0.01, "")]) == {}


def test_server_timing_round_trips_every_stage() -> None:
    stages = parse_server_timing(header(3.0, 20.0))
    assert list(stages) == ["wait", "tokenize", "slot", "send", "queue", "inference", "total"]
    assert (stages["wait"], stages["tokenize"], stages["queue"], stages["inference"]) == (1.0, 2.0, 3.0, 4.0)
    assert stages["send"] == pytest.approx(0.5)  # the call (8 ms) less the replica's time (7.5 ms)


def test_the_share_within_the_bar_is_given_for_the_overloads_first_second_and_after() -> None:
    # (due at, latency, sent late by): the onset's requests slow, the steady state's fast but for one
    sent = [(0.05, 0.080), (0.10, 0.070), (0.50, 0.030), (1.0, 0.030), (2.0, 0.040), (3.5, 0.060)]
    accepted = [(at, latency, 0.0) for at, latency in sent]  # none sent late
    split = within_bar(accepted, bar_s=0.045)
    assert split["accepted_first_second"] == 3
    assert split["accepted_within_3x_first_second"] == pytest.approx(1 / 3, abs=1e-4)
    assert split["accepted_within_3x_after_first_second"] == pytest.approx(2 / 3, abs=1e-4)
    assert split["accepted_within_3x_unloaded_p99"] == pytest.approx(3 / 6)
    assert split["accepted_sent_late_20ms"] == 0
    assert split["accepted_within_3x_from_send"] == split["accepted_within_3x_unloaded_p99"]
    assert within_bar([], bar_s=0.045)["accepted_within_3x_unloaded_p99"] == 0.0


def test_a_request_the_load_generator_sent_late_misses_the_bar_but_not_from_its_actual_send() -> None:
    # the second request was due at 1.0 s and sent 150 ms late (a stalled client): 160 ms from when it was due
    accepted = [(0.5, 0.020, 0.001), (1.0, 0.160, 0.150), (1.5, 0.060, 0.010)]
    split = within_bar(accepted, bar_s=0.045)
    assert split["accepted_within_3x_unloaded_p99"] == pytest.approx(1 / 3, abs=1e-4)  # judged from when due
    assert split["accepted_sent_late_20ms"] == 1
    assert split["accepted_within_3x_from_send"] == pytest.approx(2 / 3, abs=1e-4)  # 20 and 10 ms; 50 ms misses
