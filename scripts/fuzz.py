"""Fuzz a running service over HTTP: generated bodies on every route, no 5xx, every error in the documented shape.

    python scripts/fuzz.py --url http://127.0.0.1:8000 --cases 10000          # the full run
    python scripts/fuzz.py --url ... --cases 1000 --seed 7 --api-key KEY    # CI's slice (tests/test_fuzz.py)

Bodies mix valid-looking requests with wrong types, huge and empty strings, unicode edge cases (surrogates,
NUL, combining marks, right-to-left, 4-byte emoji), deeply nested JSON, duplicate keys, very long lists,
malformed JSON and non-JSON bytes. A case fails if the answer is a 5xx other than 503 (back-pressure),
if an error body is not ``{error, error_type, message, detail}``, or if no answer comes in time. After the
run, a normal request must still succeed. A request refused for overload (503) is sent again after its
Retry-After, as clients do: a case once more, the normal request up to 3 times in all. Prints a JSON
summary; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

POST_ROUTES = [
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/v1/classify",
    "/v1/embeddings",
    "/embed",
    "/predict",
    "/v1/search",
]
GET_ROUTES = ["/v1/models", "/info", "/health", "/ready", "/openapi.json"]
FIELDS = [
    "query", "documents", "texts", "inputs", "input", "model", "top_n", "top_k", "return_documents", "truncate",
    "raw_scores", "encoding_format", "dimensions", "max_tokens_per_doc", "return_text", "normalize",
    "intent_top_k", "truncation_direction", "prompt_name",
]  # fmt: skip
ERROR_KEYS = {"error", "error_type", "message", "detail"}
JSON = {"content-type": "application/json"}
RESEND_CASE = 2  # tries per case: one more after a refusal for overload
UNICODE = [
    "\u0000", "\ud800", "\udfff", "\ufeff", "\u202e", "e\u0301\u0301\u0301", "\U0001f600" * 3, "\u200b",
    "\uffff", "Ω≈ç√", "نص عربي", "日本語テキスト", "\x1b[31m", "\r\n\t", "\\u0000", "\U0001d518\U0001d52b",
]  # fmt: skip


class Generator:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def text(self) -> str:
        r = self.r
        kind = r.random()
        if kind < 0.08:
            return ""
        if kind < 0.14:
            return " " * r.randint(1, 50)
        if kind < 0.2:
            return "long text " * r.randint(1_000, 4_000)  # past max_text_chars or the largest bucket
        if kind < 0.45:
            return "".join(r.choice(UNICODE) for _ in range(r.randint(1, 8)))
        words = ["reset", "password", "balance", "weather", "transfer", "card", "the", "a", "how", "do", "I"]
        return " ".join(r.choice(words) for _ in range(r.randint(1, 30)))

    def scalar(self) -> Any:
        r = self.r
        return r.choice(
            [
                None, True, False, 0, -1, 1, 2**63, -(2**70), 1.5, -0.0, 1e308, r.randint(-5, 300), self.text(),
                "NaN", "1", [], {},
            ]
        )  # fmt: skip

    def value(self, depth: int = 0) -> Any:
        r = self.r
        roll = r.random()
        if depth > 3 or roll < 0.45:
            return self.scalar()
        if roll < 0.7:
            return [self.text() for _ in range(r.choice([0, 1, 2, 5, 20, 300, 1_500]))]  # very long lists
        if roll < 0.85:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.text()[:10]: self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def body(self) -> bytes:
        """A request body: mostly JSON objects of the API's fields, sometimes raw bytes no parser expects."""
        r = self.r
        roll = r.random()
        if roll < 0.05:
            depth = r.choice([50, 1_000, 100_000])
            return (
                ("[" * depth + "]" * depth).encode()
                if r.random() < 0.5
                else ('{"a":' * depth + "1" + "}" * depth).encode()
            )
        if roll < 0.1:
            return r.choice(
                [b"", b"{", b"nul", b"\xff\xfe\x00", b'{"query": "q",}', b"[]", b"42", b'"text"', b"{}" * 3]
            )
        if roll < 0.15:  # duplicate keys: the last one wins in Python's parser
            return b'{"query": "q", "query": 5, "documents": ["a"], "documents": "x", "inputs": "hi", "inputs": []}'
        fields = {f: self.value() for f in r.sample(FIELDS, r.randint(0, 6))}
        if r.random() < 0.4:  # close to a valid request, with one field perturbed
            fields = {"query": self.text(), "documents": [self.text() for _ in range(r.randint(1, 5))], **fields}
        return json.dumps(fields, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")

    def case(self) -> tuple[str, str, bytes]:
        if self.r.random() < 0.05:
            return "GET", self.r.choice(GET_ROUTES), b""
        return "POST", self.r.choice(POST_ROUTES), self.body()


async def run(
    url: str, cases: int, seed: int, concurrency: int, api_key: str | None, timeout_s: float
) -> dict[str, Any]:
    gen = Generator(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    statuses: Counter[int] = Counter()
    failures: list[dict[str, Any]] = []
    resent = 0  # cases sent again after a refusal for overload
    queue: asyncio.Queue[tuple[int, tuple[str, str, bytes]]] = asyncio.Queue()
    for i in range(cases):
        queue.put_nowait((i, gen.case()))
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers) as client:

        async def worker() -> None:
            nonlocal resent
            while not queue.empty():
                i, (method, path, body) = queue.get_nowait()
                try:
                    answers = await _obeying_retry_after(
                        functools.partial(client.request, method, path, content=body, headers=JSON), RESEND_CASE, 2.0
                    )
                except httpx.HTTPError as e:
                    failures.append({"case": i, "path": path, "why": f"no answer: {type(e).__name__}"})
                    continue
                resent += len(answers) - 1
                statuses[answers[-1].status_code] += 1
                for r in answers:
                    why = _check(r)
                    if why:
                        failures.append(
                            {
                                "case": i,
                                "path": path,
                                "status": r.status_code,
                                "why": why,
                                "body": body[:200].decode("utf-8", "replace"),
                            }
                        )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        normal_body = {"query": "reset my password", "documents": ["Reset it in Settings.", "Sunny."]}
        normal = await _obeying_retry_after(lambda: client.post("/v1/rerank", json=normal_body), 3, 10.0)
    return {
        "cases": cases,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
        "statuses": dict(sorted(statuses.items())),
        "failures": len(failures),
        "first_failures": failures[:10],
        "resent_after_a_refusal": resent,
        "normal_request_after": normal[-1].status_code,
        "normal_request_refused_first": len(normal) - 1,
    }


async def _obeying_retry_after(
    send: Callable[[], Awaitable[httpx.Response]], tries: int, max_wait_s: float
) -> list[httpx.Response]:
    """Send, and while refused for overload (503) send again after its Retry-After (at most ``max_wait_s``), at
    most ``tries`` times in all, as a client does: every answer, the last one final. A fast fuzzer overloads a
    2-core service (bodies of 1,500 texts), and HAProxy repeats the ingress's refusals for a few ms: without
    this, about half the cases of a CI run were refused before any validation saw them."""
    answers = [await send()]
    while answers[-1].status_code == 503 and len(answers) < tries:
        await asyncio.sleep(min(max_wait_s, float(answers[-1].headers.get("retry-after", 1) or 1)))
        answers.append(await send())
    return answers


def _check(r: httpx.Response) -> str | None:
    if r.status_code >= 500 and r.status_code != 503:
        return f"server error {r.status_code}: {r.text[:200]}"
    if r.status_code >= 400:
        try:
            err = r.json()
        except ValueError:
            return "error body is not JSON"
        if not isinstance(err, dict) or set(err) != ERROR_KEYS or not all(isinstance(err[k], str) for k in ERROR_KEYS):
            return f"error body is not the documented shape: {r.text[:200]}"
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout-s", type=float, default=60.0)
    a = p.parse_args()
    summary = asyncio.run(run(a.url, a.cases, a.seed, a.concurrency, a.api_key, a.timeout_s))
    print(json.dumps(summary, indent=2))
    return 0 if summary["failures"] == 0 and summary["normal_request_after"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
