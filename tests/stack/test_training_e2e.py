"""End to end through the real path: the sample workload (CPU, the hook inside) pushes to the real
exporter (``python -m exporter --simulate``) on loopback, and a scrape of /metrics shows it.

Each test starts real processes (torch import ≈ 4 s each), so they are few and each checks a lot.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from harness.support import (
    WORKLOAD_ENV,
    ManagedProcess,
    free_port,
    http_post_json,
    scrape,
    start_exporter,
    wait_until,
)

pytestmark = pytest.mark.slow

Metrics = dict[str, list[tuple[dict[str, str], float]]]
GiB = 1 << 30


def exporter(log_dir: Path, *extra: str, port: int | None = None, name: str = "exporter") -> tuple[ManagedProcess, str]:
    return start_exporter(
        log_dir, "--simulate", "healthy-8gpu", "--interval", "0.2", "--docker", "off", *extra, port=port, name=name
    )


def workload(log_dir: Path, url: str, job: str, *args: str, name: str = "train") -> ManagedProcess:
    argv = [sys.executable, "-m", "workload.train", "--device", "cpu", "--job", job, "--exporter-url", url]
    argv += ["--push-interval", "0.1", "--log-every", "0", *args]
    return ManagedProcess(name, argv, log_dir, env=WORKLOAD_ENV)


def finish(proc: ManagedProcess, timeout: float = 90.0) -> tuple[list[dict[str, float]], str]:
    """Wait for the workload to exit 0; return its per-rank result lines and its log."""
    try:
        rc = proc.proc.wait(timeout)
    except BaseException:
        proc.stop(signal.SIGKILL)
        raise
    proc.stop()
    text = proc.log_path.read_text(errors="replace")
    assert rc == 0, f"workload failed ({rc}):\n{text}"
    results = [json.loads(line)["result"] for line in text.splitlines() if line.startswith('{"result"')]
    assert results, text
    return sorted(results, key=lambda r: r["rank"]), text


def values(metrics: Metrics, name: str, **labels: str) -> list[float]:
    return [v for lab, v in metrics.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]


def one(metrics: Metrics, name: str, **labels: str) -> float:
    found = values(metrics, name, **labels)
    assert len(found) == 1, f"expected one {name}{labels}, found {found}"
    return found[0]


def hook_lines(log: str, needle: str) -> int:
    return sum(1 for line in log.splitlines() if needle in line)


def test_single_rank_series_oom_nan_auth_and_nvml_join(log_dir: Path) -> None:
    exp, base = exporter(log_dir)
    job = "e2e-single"
    t_start = time.time()
    train = workload(
        log_dir, base, job, "--steps", "60", "--step-delay", "0.03",
        "--fault", "oom@5", "--fault", "nan@10:3", "--fault", "auth@1.0", "--quota", "1000",
    )  # fmt: skip
    try:
        pid = str(train.proc.pid)
        wait_until(lambda: values(scrape(base), "training_steps_total", training_job=job, pid=pid), 60, message="first push")
        # NVML sees the training process on GPU 0: the exporter labels its memory with job and rank.
        status, body = http_post_json(
            base + "/-/simulate/events",
            {"gpu": 0, "add_process": {"pid": int(pid), "type": "compute", "used_memory_bytes": "4GiB"}},
        )
        assert status in (200, 202), body

        def joined() -> list[tuple[dict[str, str], float]]:
            return [(lab, v) for lab, v in scrape(base).get("gpu_process_memory_used_bytes", []) if lab.get("pid") == pid]

        series = wait_until(joined, 30, message="per-process GPU memory of the workload")
        assert [(s[0]["gpu"], s[0]["training_job"], s[0]["rank"], s[1]) for s in series] == [("0", job, "0", 4 * GiB)]
        (result,), log = finish(train)
        assert result["steps"] == 59 and result["ooms_caught"] == 1 and result["nonfinite"] == 3
        assert result["auth_failures"] > 0, log  # the token expired mid-run and the server said 401
        m = scrape(base)  # the hook pushed its final counters before the workload exited
    finally:
        train.stop(signal.SIGKILL)
        exp.stop()

    who = {"training_job": job, "pid": pid, "rank": "0", "local_rank": "0", "world_size": "1"}
    assert one(m, "training_info", **who, device="cpu", framework="plain") == 1
    assert one(m, "training_steps_total", **who) == 59  # the OOM step is not a completed step
    assert one(m, "training_step_duration_seconds_count", **who) == 59
    assert one(m, "training_samples_total", **who) == 59 * 8
    assert one(m, "training_data_wait_seconds_total", **who) >= 59 * 0.03  # each step slept in its input
    assert one(m, "training_compute_seconds_total", **who) > 0
    # The OOM was caught by the training loop and still counted, with the size it asked for.
    assert one(m, "training_cuda_oom_total", **who) == 1
    assert one(m, "training_cuda_oom_last_requested_bytes", **who) == 20 * GiB
    assert one(m, "training_cuda_oom_last_free_bytes", **who) == 1.5 * GiB
    assert t_start <= one(m, "training_cuda_oom_last_timestamp_seconds", **who) <= time.time()
    assert one(m, "training_nonfinite_loss_total", **who) == 3
    assert 0 < one(m, "training_loss", **who) < 100
    auth = one(m, "training_auth_failures_total", **who, service="dataset", status_code="401")
    assert auth == result["auth_failures"]
    expiry = one(m, "training_token_expiry_timestamp_seconds", **who, service="dataset")
    assert t_start < expiry < t_start + 30  # the JWT's exp: about one second after the workload began
    # Every step fetched a batch (60); those that got through used the quota, the rest got 401.
    assert one(m, "training_api_quota_limit", **who, service="dataset") == 1000
    assert one(m, "training_api_quota_remaining", **who, service="dataset") == 1000 - (60 - auth)
    assert t_start <= one(m, "training_last_progress_timestamp_seconds", **who) <= time.time()
    assert one(m, "training_last_seen_timestamp_seconds", **who) >= t_start
    assert one(m, "gpu_exporter_ingest_requests_total", outcome="accepted") > 2


def test_exporter_restart_mid_run_loses_no_counts(log_dir: Path) -> None:
    port = free_port()
    exp, base = exporter(log_dir, port=port, name="exporter-1")
    job = "e2e-restart"
    train = workload(log_dir, base, job, "--steps", "0", "--step-delay", "0.01")  # until SIGTERM
    exp2: ManagedProcess | None = None
    try:
        pid = str(train.proc.pid)

        def steps_at(url: str) -> float:
            found = values(scrape(url), "training_steps_total", training_job=job, pid=pid)
            return found[0] if found else 0.0

        before = wait_until(lambda: (n := steps_at(base)) >= 10 and n, 60, message="steps at exporter 1")
        exp.stop(signal.SIGKILL)  # a crash: nothing flushed, nothing kept
        wait_until(lambda: "cannot reach the exporter" in train.log(), 30, message="hook notices the outage")
        exp2, base2 = exporter(log_dir, port=port, name="exporter-2")
        assert base2 == base
        # The first push to the new exporter already carries everything counted since the job began.
        first = wait_until(lambda: steps_at(base), 60, message="steps at exporter 2")
        assert first > before
        train.stop(signal.SIGTERM)  # the workload finishes its step, flushes and exits 0
        (result,), log = finish(train)
        final = wait_until(lambda: (n := steps_at(base)) == result["steps"] and n, 10, message="final count")
        m = scrape(base)
    finally:
        train.stop(signal.SIGKILL)
        exp.stop()
        if exp2 is not None:
            exp2.stop()
    assert final == result["steps"] >= first
    assert one(m, "training_samples_total", training_job=job, pid=pid) == result["steps"] * 8
    assert hook_lines(log, "cannot reach the exporter") == 1
    assert hook_lines(log, "reaching the exporter at") == 1


def test_exporter_absent_training_finishes_and_logs_once(log_dir: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    train = workload(log_dir, nobody, "e2e-absent", "--steps", "40", "--step-delay", "0.03", "--push-interval", "0.05")
    try:
        (result,), log = finish(train)
    finally:
        train.stop(signal.SIGKILL)
    assert result["steps"] == 40  # ≈1.2 s: several pushes tried and failed (backoff from 0.05 s)
    assert hook_lines(log, "cannot reach the exporter") == 1, log
    assert "Traceback" not in log


def test_ddp_two_gloo_ranks_are_labelled_and_expire_after_ttl(log_dir: Path) -> None:
    # The TTL leaves room for a loaded machine between one rank's last push and the other's exit.
    exp, base = exporter(log_dir, "--training-ttl", "20")
    job = "e2e-ddp"
    # Rank 1's input pipeline is 4x slower than its step: its data wait shows the straggler.
    train = workload(log_dir, base, job, "--ddp", "2", "--steps", "20", "--fault", "slow-rank@1:4")
    try:
        results, log = finish(train, timeout=120)

        def both_final() -> Metrics | None:
            m = scrape(base)
            done = values(m, "training_steps_total", training_job=job, world_size="2")
            return m if done == [20.0, 20.0] else None

        m = wait_until(both_final, 5, message="final counts of both ranks")
        # Past the TTL the silent processes' series go away, and so does the processes gauge.
        wait_until(lambda: not values(scrape(base), "training_info", training_job=job), 60, message="TTL expiry")
        after = scrape(base)
    finally:
        train.stop(signal.SIGKILL)
        exp.stop()
    assert [r["rank"] for r in results] == [0, 1] and all(r["steps"] == 20 for r in results), log
    pids = {str(r["rank"]): str(r["pid"]) for r in results}
    for rank in ("0", "1"):
        who = {"training_job": job, "rank": rank, "local_rank": rank, "world_size": "2", "pid": pids[rank]}
        assert one(m, "training_info", **who) == 1
        assert one(m, "training_steps_total", **who) == 20
    wait = {r: one(m, "training_data_wait_seconds_total", training_job=job, rank=r) for r in ("0", "1")}
    assert wait["1"] > wait["0"], wait
    assert one(m, "gpu_exporter_training_processes") >= 2
    assert one(after, "gpu_exporter_training_processes") == 0
    assert not values(after, "training_steps_total", training_job=job)
