"""A request's time by stage, in its response headers: TEI's ``x-*-time`` (whole milliseconds, which TEI clients
and benchmarks read) and the W3C ``Server-Timing`` header with the finer split (browsers' and proxies' tools
show it). On every answer a model computed; a few clock reads per request.

- ``x-total-time``: from the request reaching the ingress's handler to its response;
- ``x-tokenization-time``: tokenizing it (waiting for a tokenizer thread included);
- ``x-queue-time``: from its model call to its forwards, and the answer's way back (``slot`` + ``send`` + ``queue``);
- ``x-inference-time``: the backend's time in the batches that computed it;
- ``Server-Timing``: ``wait`` (before the handler: HAProxy's stamp, where it is read), ``tokenize``, ``slot`` (in
  the ingress, waiting for one of its calls in flight to the model), ``send`` (both hops between the ingress
  and the model replica: Serve's router, the transport, the replica taking the call up), ``queue`` (in the
  replica, not computing: waiting for a batch, for the device), ``inference``, ``total``, in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.core.timing import ModelTiming


@dataclass
class RequestTiming:
    wait_s: float = 0.0  # before the ingress's handler (HAProxy's stamp), 0 where it is not read
    tokenize_s: float = 0.0
    model_call_s: float = 0.0  # from the ingress's model call to its answer
    model: ModelTiming = field(default_factory=ModelTiming)

    def called(self, call_s: float) -> None:
        """A model call took ``call_s`` seconds, from the ingress's side."""
        self.model_call_s = max(self.model_call_s, call_s)

    def replied(self, model: ModelTiming) -> None:
        """... and its answer said how long it spent in the model replica."""
        self.model = self.model.longest(model)

    def headers(self, total_s: float) -> dict[str, str]:
        m = self.model
        if m.in_replica_s > 0:  # the call's time outside the replica, and in it before its batch
            send_s = max(0.0, self.model_call_s - m.in_replica_s - m.slot_s)
            queue_s = m.slot_s + send_s + m.queue_s
        else:  # the replica said nothing of its time (a fake): all of the call but the forward
            send_s, queue_s = 0.0, max(0.0, self.model_call_s - m.inference_s)
        stages = (
            ("wait", self.wait_s),
            ("tokenize", self.tokenize_s),
            ("slot", m.slot_s),
            ("send", send_s),
            ("queue", m.queue_s),
            ("inference", m.inference_s),
            ("total", total_s),
        )
        return {
            "x-total-time": _whole_ms(total_s),
            "x-tokenization-time": _whole_ms(self.tokenize_s),
            "x-queue-time": _whole_ms(queue_s),
            "x-inference-time": _whole_ms(m.inference_s),
            "server-timing": ", ".join(f"{name};dur={max(0.0, s) * 1000:.2f}" for name, s in stages),
        }


def _whole_ms(seconds: float) -> str:
    return str(int(max(0.0, seconds) * 1000))


def parse_server_timing(value: str) -> dict[str, float]:
    """``Server-Timing`` back into {name: milliseconds} (clients, tests, the bench)."""
    out: dict[str, float] = {}
    for entry in value.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, number = param.strip().partition("=")
            if key == "dur":
                out[name] = float(number)
    return out
