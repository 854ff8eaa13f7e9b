"""HAProxy answers for the ingress while the ingress is refusing a route for overload.

A refusal answered by the ingress costs it nearly what a classify request costs: the HTTP request through
Ray's direct-ingress code and the event loop. At 4x overload three requests in four are refusals, so the
ingress spends much of its CPU saying no, and answers later both the requests it accepts and those it refuses
(an H100 node: refusals up to 117-135 ms, and goodput falling as the offered load rose). HAProxy refuses in
microseconds, in C, on its own threads.

HAProxy does not guess when to refuse: it repeats the ingress. For each route (the request path) it remembers
whether the ingress's latest answer was a refusal for overload (a 503 with ``X-Overloaded: ingress``, sent when
the expected queueing time is over the budget) and when. While it was, and less than ``memory_ms`` ago, HAProxy
refuses new requests of that route itself: the ingress would have refused them too, its queue being full. Any
other answer of the ingress (an accepted request done, a client error, a 503 ``unavailable``) ends that, and so
does the time: after ``memory_ms`` without an answer the next request goes to the ingress, which decides again.

A probability instead (the adaptive throttling of Google's SRE book: refuse ``(requests - K x accepted) /
(requests + 1)`` of them) was tried first and dropped: its refusals are blind, and each costs a caller that obeys
Retry-After a second. In front of a stand-in ingress taking 12 requests at a time, 80 such callers lost 40 % of
their throughput with K = 2, and 256 lost 80 % with K = 1.1 (its refusals came in bursts, so did theirs). Repeating
the ingress, they kept all of it while HAProxy answered half the refusals (``tests/test_haproxy_launcher.py``).

HAProxy's refusal is the ingress's: status 503, the same JSON body, the ``Retry-After`` of the ingress's latest
refusal on that route, and ``X-Overloaded: haproxy``. The memory lives in each node's HAProxy (a reload clears
it) and costs a lookup in a small table per request. The rules need HAProxy 2.5 or later (arrays of general
purpose tags); ``ray[serve]`` ships 2.8. On by default (``ray_serve.haproxy_shedding``).

HAProxy also stamps each request it forwards with the time it held the whole of it (``X-Serve-Arrived-Us``).
The ingress's queueing budget then covers the time a request waited before the ingress's handler ran: in
HAProxy, the ingress's socket, its event loop. That wait is invisible to the queues the ingress keeps, and it is
what grows when the ingress itself, not a model, is what is saturated (``batching.count_wait_before_ingress``).

HAProxy answers only a request whose whole body it holds (``req.body_len``, what it has read, equals the
Content-Length; ``req.body_size`` is the announced length and says nothing). A body larger than its buffer is
still arriving when the rules run: refused then, the connection closes under the sender, who sees a reset
instead of the 503 (31-37 of ``tests/test_fuzz.py``'s 1,000 requests, bodies of 2-4 MB, while the guard read
``req.body_size``). Such a request goes to the ingress, which reads it and answers.
"""

from __future__ import annotations

import json

from serve_app.api import errors, http, routes

TABLE = "serve_app_shed"  # the backend that only holds the table: per route, the ingress's latest answer
STAMP_RULE = f"http-request set-header {http.ARRIVED_HEADER} %[date(0,us)]"
MARKER = "# serve_app: refuse for the ingress while it refuses (serve_app/deployments/haproxy_shedding.py)"


def scored_paths() -> tuple[str, ...]:
    """The routes that send work to a model: every POST route."""
    return tuple(r.path for r in routes.ALL if r.method == "POST")


def frontend_rules() -> tuple[str, ...]:
    """The lines for Ray's HTTP frontend. Per route: gpt(0) is 1 while the ingress's latest answer was a refusal
    for overload, gpt(1) that refusal's Retry-After, gpc0's rate (over ``memory_ms``) how recent it was."""
    paths = scored_paths()
    refusal = json.dumps(errors.body(errors.OVERLOADED_MESSAGE, "overloaded"))
    if "'" in refusal or any(not p.startswith("/") or " " in p for p in paths):
        raise ValueError("the refusal body and paths must fit HAProxy's quoting")
    tracked = "{ sc0_tracked }"
    refused = f"{tracked} serve_app_503 serve_app_by_ingress"
    return (
        MARKER,
        # when HAProxy held the whole request (``option http-buffer-request``): the ingress counts the time since
        # against its queueing budget. Set on every request, so a client's own header of that name is replaced
        STAMP_RULE,
        f"acl serve_app_scored path -m end {' '.join(paths)}",
        f"http-request track-sc0 path table {TABLE} if METH_POST serve_app_scored",
        # only a request whose whole body HAProxy holds (body_len: read so far; body_size is the announced length):
        # answered while still being sent, its connection would close under the sender
        f"http-request set-var(txn.sa_held) req.body_len if {tracked}",
        f"http-request set-var(txn.sa_unread) req.hdr_val(content-length),sub(txn.sa_held) if {tracked}",
        "http-request return status 503 content-type application/json"
        f" string '{refusal}' hdr Retry-After %[sc_get_gpt(1,0)] hdr {errors.OVERLOADED_HEADER} haproxy"
        f" if {tracked} {{ sc_get_gpt(0,0) gt 0 }} {{ sc0_gpc0_rate gt 0 }} {{ var(txn.sa_unread) -m int eq 0 }}",
        "acl serve_app_503 status 503",
        f"acl serve_app_by_ingress res.hdr({errors.OVERLOADED_HEADER.lower()}) -m str ingress",
        f"http-response sc-inc-gpc0(0) if {refused}",
        f"http-response sc-set-gpt(1,0) res.hdr(retry-after) if {refused}",
        f"http-response sc-set-gpt(0,0) int(1) if {refused}",
        f"http-response sc-set-gpt(0,0) int(0) if {tracked} !serve_app_503 || {tracked} !serve_app_by_ingress",
    )


def table_section(memory_ms: int) -> tuple[str, ...]:
    """One entry per route, forgotten after a minute unused. A rate over ``memory_ms`` stays above zero for
    between one and two such periods after the ingress's refusal."""
    return (
        f"backend {TABLE}",
        f"    stick-table type string len 256 size 1k expire 60s store gpc0_rate({memory_ms}ms),gpt(2)",
    )
