"""The hook's diagnosis side (issue 16): phases, step index, collective waits, and how a process ends.

Exits are tested with real child processes (no torch: they start fast) pushing through the hook's real
sender to a recording HTTP receiver, and their exit status is checked: the hook must report the end
and never change it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from exporter.hook import progress
from exporter.hook.monitor import Monitor
from harness.alert_stack import WebhookReceiver
from harness.process import REPO_ROOT
from harness.support import wait_until


def phase(mon: Monitor) -> str:
    return str(mon.build_payload()["phase"])


def test_phases_follow_the_step_with_data_ready() -> None:
    mon = Monitor("j")
    assert phase(mon) == "between_steps"
    mon.step_begin()
    mon.data_ready()  # from now on this job splits data wait from compute
    mon.step_end()
    mon.step_begin()
    assert phase(mon) == "data"
    t = time.time()
    mon.data_ready()
    doc = mon.build_payload()
    assert doc["phase"] == "compute" and doc["gauges"]["step_index"] == 2
    assert t - 1 <= doc["gauges"]["phase_start_timestamp_seconds"] <= time.time() + 1
    mon.step_end()
    assert phase(mon) == "between_steps"


def test_phases_with_a_plain_with_block() -> None:
    mon = Monitor("j")
    with mon.step():
        assert phase(mon) == "compute"
    assert phase(mon) == "data"  # between two `with` blocks the loader runs: that is the data wait
    with mon.checkpoint():
        assert phase(mon) == "checkpoint"
    assert phase(mon) == "data"


def test_a_collective_inside_a_step_is_a_wait_not_own_work() -> None:
    mon = Monitor("j")
    with mon.step():
        with mon.collective():
            assert phase(mon) == "collective"
            time.sleep(0.05)
        time.sleep(0.02)
    with mon.collective():  # outside a step: not part of any step time, so not counted
        time.sleep(0.02)
    doc = mon.build_payload()
    wait = doc["counters"]["collective_wait_seconds"]
    assert 0.05 <= wait < doc["counters"]["step_duration_seconds_sum"] - 0.015
    assert doc["counters"]["step_duration_seconds_sum"] >= 0.07


def test_a_failed_step_is_remembered_until_one_completes() -> None:
    mon = Monitor("j")
    with pytest.raises(KeyError), mon.step():
        raise KeyError("x")
    assert mon._step_exc == "KeyError"
    with mon.step():
        pass
    assert mon._step_exc is None
    assert mon.build_payload()["gauges"]["step_index"] == 2 and mon.steps == 1


def test_phase_codes_match_the_schema() -> None:
    from exporter.hook.schema import PHASES

    assert PHASES[progress.COLLECTIVE] == "collective" and PHASES[progress.DATA] == "data"


# ------------------------------------------------------------------------------------------ exits
SCRIPT_HEAD = """
import os, sys, time
import exporter.hook as gpu_hook
mon = gpu_hook.start(job="exit-test", url={url!r}, interval=0.05)
with mon.step():
    pass
print("ready", flush=True)
"""

CASES: dict[str, str] = {
    "normal": "",
    "exception": "raise ValueError('boom')",
    "keyboard": "raise KeyboardInterrupt",
    "sigterm": "time.sleep(60)",
    # The main thread blocked in C forever (a hung collective): a second lock of a plain pthread mutex.
    "sigterm_blocked": textwrap.dedent("""
        import ctypes
        libc = ctypes.CDLL(None)
        mutex = ctypes.create_string_buffer(64)
        libc.pthread_mutex_init(mutex, None)
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)
    """),
    # The job's own handler turns SIGTERM into a clean stop: its choice stands.
    "own_handler": textwrap.dedent("""
        import signal
        stop = []
        signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
        while not stop:
            time.sleep(0.01)
    """),
    # An exception inside a step, caught by a wrapper that exits with sys.exit(1) (as torch.multiprocessing.spawn does).
    "wrapped": textwrap.dedent("""
        try:
            with mon.step():
                raise RuntimeError("inside the step")
        except RuntimeError:
            sys.exit(1)
    """),
}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """Records the hook's pushes (any 2xx is a delivery for the hook)."""
    r = WebhookReceiver().start()
    yield r
    r.stop()


def pushes(recv: WebhookReceiver) -> list[dict[str, Any]]:
    return [n.body for n in recv.notifications()]


def run_case(recv: WebhookReceiver, case: str, sig: int | None = None) -> tuple[int, str, dict[str, Any]]:
    code = SCRIPT_HEAD.format(url=recv.url) + CASES[case]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        if sig is not None:
            wait_until(lambda: pushes(recv), 10, message="a first push")
            time.sleep(0.2)  # let the child reach its blocking call (the signal must find it there)
            proc.send_signal(sig)
        rc = proc.wait(30)
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    exits = [p["exit"] for p in pushes(recv) if "exit" in p]
    assert exits, f"no exit reported ({case}); stderr:\n{stderr}"
    return rc, stderr, exits[-1]


@pytest.mark.parametrize(
    ("case", "sig", "rc", "reason", "detail"),
    [
        ("normal", None, 0, "normal", ""),
        ("exception", None, 1, "exception", "ValueError"),
        ("keyboard", None, -signal.SIGINT, "signal", "SIGINT"),  # Python itself dies by SIGINT
        ("sigterm", signal.SIGTERM, -signal.SIGTERM, "signal", "SIGTERM"),
        ("sigterm_blocked", signal.SIGTERM, -signal.SIGTERM, "signal", "SIGTERM"),
        ("sigterm", signal.SIGHUP, -signal.SIGHUP, "signal", "SIGHUP"),
        ("own_handler", signal.SIGTERM, 0, "normal", ""),
        ("wrapped", None, 1, "exception", "RuntimeError"),
    ],
)
def test_the_last_push_says_how_the_process_ended_and_the_exit_is_unchanged(
    receiver: WebhookReceiver, case: str, sig: int | None, rc: int, reason: str, detail: str
) -> None:
    got_rc, stderr, exit_doc = run_case(receiver, case, sig)
    assert got_rc == rc, stderr
    assert (exit_doc["reason"], exit_doc["detail"]) == (reason, detail)
    assert time.time() - 60 < exit_doc["timestamp"] <= time.time()
    if case == "exception":
        assert "ValueError: boom" in stderr  # the previous excepthook (the traceback) still ran


def test_watch_ddp_times_the_all_reduce_and_leaves_comm_hooks_to_the_job() -> None:
    """1-rank gloo DDP in this process: the wait is timed inside the step, and the job can still
    register its own comm hook (watch_ddp does not take DDP's one hook slot)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)))
        mon = Monitor("ddp")
        assert mon.watch_ddp(net)
        calls: list[int] = []

        def job_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP wants real classes or none
            calls.append(1)
            return default_hooks.allreduce_hook(None, bucket)

        net.register_comm_hook(None, job_hook)
        x = torch.randn(2, 4)
        for _ in range(3):
            with mon.step():
                net(x).sum().backward()
        doc = mon.build_payload()
        wait, total = doc["counters"]["collective_wait_seconds"], doc["counters"]["step_duration_seconds_sum"]
        assert 0 < wait < total and calls
        assert doc["phase"] == "data"  # between `with` blocks, after the step's collective ended
        assert not mon.watch_ddp(object())  # not a module: refused and logged, never raised
    finally:
        dist.destroy_process_group()
