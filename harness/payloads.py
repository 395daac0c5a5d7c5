"""A training push exactly as the real hook builds it (tests of ingest, collectors and exposition)."""

from __future__ import annotations

import json
from typing import Any

from exporter.hook.monitor import Monitor
from exporter.hook.schema import COUNTERS


def payload(**over: Any) -> dict[str, Any]:
    """A push as the real hook builds it (a few steps recorded), with overrides."""
    mon = Monitor("job-a", rank=1, local_rank=1, world_size=2)
    for _ in range(3):
        mon.step_begin()
        mon.data_ready()
        mon.step_end(samples=8, tokens=100)
    mon.observe_loss(0.5)
    mon.record_auth_failure("hf_hub", 401)
    mon.set_token_expiry("hf_hub", 2_000_000_000)
    mon.set_api_quota("openai", 10, 100)
    doc = mon.build_payload()
    for key, value in over.items():
        doc[key] = value
    return doc


def minimal_push(pid: int, job: str = "live", rank: int = 0, seq: int = 1) -> bytes:
    """The smallest valid push body: identity and every counter at 1."""
    return json.dumps({
        "schema": 1, "seq": seq, "process_start_time": 1_700_000_000.0,
        "identity": {"hostname": "n", "training_job": job, "rank": str(rank), "pid": pid},
        "counters": {k: 1.0 for k in COUNTERS},
    }).encode()
