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

from dataclasses import dataclass

from serve_app.core.timing import UNTIMED, ModelTiming


@dataclass
class RequestTiming:
    wait_s: float = 0.0  # before the ingress's handler (HAProxy's stamp), 0 where it is not read
    tokenize_s: float = 0.0
    model_call_s: float = 0.0  # from the ingress's model call to its answer
    model: ModelTiming = UNTIMED

    def called(self, call_s: float) -> None:
        """A model call took ``call_s`` seconds, from the ingress's side."""
        if call_s > self.model_call_s:
            self.model_call_s = call_s

    def replied(self, model: ModelTiming) -> None:
        """... and its answer said how long it spent in the model replica and waiting for a call slot."""
        self.model = model if self.model is UNTIMED else self.model.longest(model)

    def raw_headers(self, total_s: float) -> list[tuple[bytes, bytes]]:
        """The response's timing headers, encoded (a few microseconds: every answer carries them)."""
        m = self.model
        if m.in_replica_s > 0:  # the call's time outside the replica, and in it before its batch
            send_s = max(0.0, self.model_call_s - m.in_replica_s - m.slot_s)
            queue_s = m.slot_s + send_s + m.queue_s
        else:  # the replica said nothing of its time (a fake): all of the call but the forward
            send_s, queue_s = 0.0, max(0.0, self.model_call_s - m.inference_s)
        timing = SERVER_TIMING % (  # milliseconds; each a clock difference, or kept >= 0 above
            1000 * self.wait_s, 1000 * self.tokenize_s, 1000 * m.slot_s, 1000 * send_s, 1000 * m.queue_s,
            1000 * m.inference_s, 1000 * total_s,
        )  # fmt: skip
        return [
            (b"x-total-time", b"%d" % (1000 * total_s)),
            (b"x-tokenization-time", b"%d" % (1000 * self.tokenize_s)),
            (b"x-queue-time", b"%d" % (1000 * queue_s)),
            (b"x-inference-time", b"%d" % (1000 * m.inference_s)),
            (b"server-timing", timing.encode("latin-1")),
        ]


STAGES = ("wait", "tokenize", "slot", "send", "queue", "inference", "total")  # Server-Timing's, in its order
SERVER_TIMING = ", ".join(f"{name};dur=%.2f" for name in STAGES)


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
