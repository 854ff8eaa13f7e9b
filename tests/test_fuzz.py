"""CI's slice of the fuzz suite: 1,000 generated bodies over HTTP against the real default graph.

The full run is the same script with ``--cases 10000`` (README, "Fuzzing").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_thousand_fuzzed_requests_get_no_5xx_and_documented_errors(service: str) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fuzz.py"), "--url", service, "--cases", "1000", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads(run.stdout)
    print(
        f"fuzz: {summary['cases']} cases in {summary['seconds']} s, statuses {summary['statuses']}, "
        f"{summary['resent_after_a_refusal']} sent again after a refusal for overload"
    )
    assert summary["failures"] == 0, summary["first_failures"]
    assert summary["normal_request_after"] == 200
    assert run.returncode == 0
    statuses = summary["statuses"]
    assert sum(statuses.values()) == 1000
    assert statuses.get("200", 0) > 50 and sum(v for k, v in statuses.items() if k.startswith("4")) > 500
