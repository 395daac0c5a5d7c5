"""A training push exactly as the real hook builds it (tests of ingest, collectors and exposition)."""

from __future__ import annotations

import json
import time
from typing import Any

from exporter.hook.monitor import Monitor
from exporter.hook.schema import COUNTERS, GAUGES


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


def largest_push(pid: int, seq: int = 1, job: str = "job", label_length: int = 128, services: int = 32) -> dict[str, Any]:
    """The biggest push the ingest schema allows for one process: every counter and gauge, every label
    ``label_length`` characters, ``services`` services in each per-service section (quota with limit).

    Each training process pushed this way costs the most series and bytes a valid client can make it cost.
    """
    def label(tag: str) -> str:
        return (tag + "-" + "x" * label_length)[:label_length]

    svc = [label(f"svc{i}") for i in range(services)]
    return {
        "schema": 1,
        "seq": seq,
        "process_start_time": 1_700_000_000.0,
        "sent_at": time.time(),
        "identity": {
            "hostname": label("host"), "training_job": label(job), "rank": label(f"r{pid}"),
            "local_rank": label("lr"), "world_size": label("ws"), "pid": pid, "device": label("dev"),
            "torch_version": label("tv"), "framework": label("fw"),
        },
        "counters": {k: float(seq) for k in COUNTERS},
        "gauges": {k: 1.5 for k in GAUGES},
        "auth_failures": [{"service": s, "status_code": label("code"), "count": seq} for s in svc],
        "token_expiry": {s: 1_800_000_000.0 for s in svc},
        "api_quota": {s: {"remaining": 10.0, "limit": 100.0} for s in svc},
        "phase": "compute",
        "exit": {"reason": "exception", "detail": label("exc"), "timestamp": 1_700_000_001.0},
    }
