"""A model version's probe set: real text, and the FP32 outputs it must reproduce wherever it serves.

The reference is computed once per version, from the FP32 ONNX graph on ONNX Runtime with one sequence per
call (no padding, no batching), and stored beside the version's artifacts
(``<artifacts_dir>/<name>/<digest>/probe-<max_length>.npz``). Every replica runs the same sequences through
the backend it chose (a TensorRT engine, torch, ONNX Runtime) during warm-up and refuses to serve on a
mismatch (``engine.probe_check``, which also computes the reference): the gate checks what will serve,
not the recipe it was built from.

Only the weights decide the reference: a graph or engine replaced on disk after the build computes other
numbers and is refused.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve_app.core.sequences import Encoded, Sequences
from serve_app.models.artifacts import ModelArtifacts
from serve_app.models.tokenizer import TextEncoder

# short queries and utterances, as search boxes and assistants see them
PROBE_QUERIES = (
    "how do I reset my online banking password",
    "what is the capital of australia",
    "transfer 200 dollars from checking to savings",
    "does vitamin d reduce the risk of respiratory infections",
    "book a table for two at an italian restaurant tonight",
    "why is my card declined abroad",
)
# passages of growing length; the last is longer than the largest bucket (it is cut there, as in serving)
PROBE_PASSAGES = (
    "Canberra is the capital city of Australia.",
    "To reset your password, open the sign-in page, choose 'Forgot password' and follow the link we send "
    "to the e-mail address registered with your account.",
    "Vitamin D supplementation was associated with a modest reduction in acute respiratory tract infections in "
    "a meta-analysis of randomised controlled trials, with the largest benefit among participants who had low "
    "baseline levels and who received daily or weekly doses rather than single large boluses.",
    "Card payments made outside your home country can be declined for several reasons: the card may not be "
    "enabled for international use, the merchant category may be blocked by default, the transaction may "
    "exceed a daily limit, or our fraud monitoring may have paused the card after an unusual purchase. You can "
    "check the travel settings in the app, raise your limits for the length of the trip, and confirm recent "
    "transactions so that the card is released. If a payment is still declined, call the number on the back "
    "of the card; the line is open at all hours and calls from abroad are free of charge.",
    " ".join(
        [
            "The restaurant opened in the old harbour warehouse in the spring and quickly became known for its "
            "hand-made pasta, a short menu that changes with the market, and a wine list drawn almost entirely "
            "from small producers in Piedmont and Sicily.",
            "Reservations open thirty days in advance and tables for two are released each morning at nine; "
            "larger groups are asked to call, and a few seats at the counter are always kept for walk-ins.",
            "The kitchen closes at half past ten, the terrace is heated in winter, and the dining room is "
            "accessible from the quay without steps.",
        ]
        * 3
    ),
)


def probe_sequences(encoder: TextEncoder, pairs: bool) -> list[Encoded]:
    """Queries and passages as single texts, or every (query, passage) pair for a cross-encoder."""
    if pairs:
        return [s for q in PROBE_QUERIES for s in encoder.encode_pairs(q, PROBE_PASSAGES)]
    return encoder.encode([*PROBE_QUERIES, *PROBE_PASSAGES])


@dataclass(frozen=True)
class ProbeReference:
    sequences: Sequences
    outputs: np.ndarray  # float32 [n, width]: the FP32 graph's output for each sequence alone

    def save(self, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.close(fd)
        s = self.sequences
        np.savez(tmp, ids=s.ids, type_ids=s.type_ids, offsets=s.offsets, truncated=s.truncated, outputs=self.outputs)
        os.replace(tmp, path)  # replicas starting together never read half a file

    @classmethod
    def load(cls, path: Path) -> ProbeReference:
        with np.load(path) as z:
            seqs = Sequences(z["ids"], z["type_ids"], z["offsets"], z["truncated"])
            return cls(seqs, np.asarray(z["outputs"], np.float32))


def reference_path(art: ModelArtifacts, artifacts_dir: str | Path, max_length: int) -> Path:
    return Path(artifacts_dir) / art.name / art.version / f"probe-{max_length}.npz"
