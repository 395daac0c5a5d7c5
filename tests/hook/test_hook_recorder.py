"""The in-process recorder (exporter.hook.monitor): step timing, OOM counting and its dedupe with the
allocator observer, loss and non-finite counts, auth/token/quota helpers, bounds, fork safety."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
from typing import Any

import pytest
import torch

import exporter.hook as gpu_hook
from exporter.hook import auth_status, jwt_expiry
from exporter.hook.cuda import parse_oom_message
from exporter.hook.monitor import Monitor
from exporter.hook.schema import MAX_SERVICES
from exporter.ingest.validate import validate_report

OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 GiB "
    "of which 10.00 MiB is free."
)


def test_step_context_splits_data_wait_and_compute() -> None:
    mon = Monitor("j")
    with mon.step(samples=4, tokens=40):
        time.sleep(0.02)
        mon.data_ready()
        time.sleep(0.01)
    assert mon.steps == 1 and mon.samples == 4 and mon.tokens == 40
    assert mon.data_wait_seconds >= 0.02 and 0.01 <= mon.compute_seconds < mon.data_wait_seconds
    assert mon.step_seconds == pytest.approx(mon.data_wait_seconds + mon.compute_seconds)
    # Without data_ready, the gap since the previous step is the data wait.
    time.sleep(0.02)
    with mon.step(samples=4):
        pass
    assert mon.steps == 2 and mon.data_wait_seconds >= 0.04
    assert mon.last_progress_time is not None and abs(mon.last_progress_time - time.time()) < 5


def test_caught_oom_inside_step_is_counted_and_not_a_step() -> None:
    mon = Monitor("j")
    for _ in range(2):
        try:
            with mon.step(samples=4):
                raise torch.OutOfMemoryError(OOM_TEXT)
        except torch.OutOfMemoryError:
            pass  # what a training loop that skips the batch does
    with pytest.raises(ValueError), mon.step():
        raise ValueError("not an OOM")
    assert mon.ooms == 2 and mon.steps == 0
    assert mon.oom_last_requested == 20 * (1 << 20) and mon.oom_last_free == 10 * (1 << 20)
    assert mon.oom_last_time is not None


def test_observer_and_exception_count_one_oom_once() -> None:
    mon = Monitor("j")
    mon._on_cuda_oom(0, 1 << 30, 5 << 30, 1 << 20)  # the allocator tells us first...
    try:
        with mon.step():
            raise torch.OutOfMemoryError(OOM_TEXT)  # ...then the same OOM surfaces as the exception
    except torch.OutOfMemoryError:
        pass
    assert mon.ooms == 1
    assert mon.oom_last_requested == 1 << 30  # the observer's exact figures are kept
    mon._on_cuda_oom(0, 1, 2, 3)  # an OOM the code caught outside any step: observer only
    assert mon.ooms == 2


def test_observer_never_raises() -> None:
    mon = Monitor("j")
    mon._on_cuda_oom("x", object(), None, "y")  # type: ignore[arg-type]
    mon._lock = None  # type: ignore[assignment]  # even with the recorder broken
    mon._on_cuda_oom(0, 1, 2, 3)


def test_parse_oom_message() -> None:
    assert parse_oom_message(OOM_TEXT) == (20 << 20, 10 << 20)
    assert parse_oom_message("something else") == (None, None)


def test_loss_values_and_nonfinite() -> None:
    mon = Monitor("j")
    mon.observe_loss(0.25)
    assert mon.loss == 0.25
    mon.observe_loss(torch.tensor(1.5))
    assert mon.loss == 1.5
    mon.observe_loss(torch.tensor(float("nan")))
    mon.observe_loss(float("inf"))
    assert mon.nonfinite_loss == 2
    mon.observe_loss(object())  # never raises into training
    payload = mon.build_payload()
    assert payload["counters"]["nonfinite_loss"] == 2


def _jwt(claims: dict[str, Any]) -> str:
    def enc(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'none'})}.{enc(claims)}.sig"


def test_jwt_expiry() -> None:
    assert jwt_expiry(_jwt({"exp": 1_900_000_000})) == 1_900_000_000.0
    assert jwt_expiry(_jwt({"sub": "x"})) is None
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry("a.%%%.b") is None
    mon = Monitor("j")
    assert mon.set_token("hf_hub", _jwt({"exp": 1_900_000_000})) == 1_900_000_000.0
    assert mon.token_expiry == {"hf_hub": 1_900_000_000.0}


def test_auth_helpers_recognise_real_client_errors() -> None:
    import httpx
    import requests
    from botocore.exceptions import ClientError, NoCredentialsError

    resp = requests.Response()
    resp.status_code = 401
    assert auth_status(requests.HTTPError(response=resp)) == "401"
    resp.status_code = 500
    assert auth_status(requests.HTTPError(response=resp)) is None

    request = httpx.Request("GET", "https://hub.example/model")
    hresp = httpx.Response(403, request=request)
    assert auth_status(httpx.HTTPStatusError("forbidden", request=request, response=hresp)) == "403"

    uerr = urllib.error.HTTPError("https://x", 401, "Unauthorized", {}, None)  # type: ignore[arg-type]
    assert auth_status(uerr) == "401"

    expired = ClientError({"Error": {"Code": "ExpiredToken", "Message": "expired"}}, "GetObject")
    assert auth_status(expired) == "expired_token"
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get")
    assert auth_status(denied) == "AccessDenied"
    missing = ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "Get")
    assert auth_status(missing) is None
    assert auth_status(NoCredentialsError()) == "expired_token"
    assert auth_status(ValueError("401")) is None

    mon = Monitor("j")
    assert mon.record_exception("s3", expired) is True
    assert mon.record_exception("s3", missing) is False
    assert mon.record_response("hub", hresp) is True
    assert mon.auth_failures == {("s3", "expired_token"): 1, ("hub", "403"): 1}


def test_huggingface_hub_errors_if_installed() -> None:
    hf_errors = pytest.importorskip("huggingface_hub.errors", reason="huggingface_hub not installed")
    import httpx

    request = httpx.Request("GET", "https://huggingface.co/api/models/x")
    response = httpx.Response(401, request=request)
    exc = hf_errors.HfHubHTTPError("401 Client Error: Unauthorized", response=response)
    assert auth_status(exc) == "401"


def test_services_are_bounded() -> None:
    mon = Monitor("j")
    for i in range(MAX_SERVICES + 10):
        mon.record_auth_failure(f"svc{i}", 401)
        mon.set_token_expiry(f"svc{i}", 1.0)
        mon.set_api_quota(f"svc{i}", 1, 2)
    mon.record_auth_failure("svc0", 401)  # a known one still counts
    assert len(mon.auth_failures) == MAX_SERVICES
    assert len(mon.token_expiry) == MAX_SERVICES and len(mon.api_quota) == MAX_SERVICES
    assert mon.auth_failures[("svc0", "401")] == 2
    validate_report(json.loads(json.dumps(mon.build_payload())))  # still within the exporter's limits


def test_payload_is_cumulative_and_sequenced() -> None:
    mon = Monitor("j", rank=3, world_size=4, flops_per_step=1e9, peak_flops=1e12)
    first = mon.build_payload()
    for _ in range(5):
        with mon.step(samples=2):
            time.sleep(0.002)
    second = mon.build_payload()
    assert second["seq"] == first["seq"] + 1
    assert second["process_start_time"] == first["process_start_time"]
    assert second["counters"]["steps"] == 5 and second["counters"]["samples"] == 10
    assert second["gauges"]["samples_per_second"] > 0
    assert 0 < second["gauges"]["model_flops_utilization_ratio"] < 1
    assert second["identity"]["rank"] == "3" and second["identity"]["world_size"] == "4"
    assert second["identity"]["pid"] == os.getpid()
    if os.path.exists("/proc/self/ns/pid"):
        assert second["identity"]["pid_namespace_inode"] == os.stat("/proc/self/ns/pid").st_ino


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_is_silent_and_gets_a_fresh_monitor() -> None:
    parent = gpu_hook.start(job="fork-test", url="http://127.0.0.1:9", interval=60)
    with parent.step():
        pass
    pid = os.fork()
    if pid == 0:  # child: a DataLoader worker, say
        code = 1
        try:
            with parent.step():
                pass  # recording still works, nothing is sent
            fresh = gpu_hook.start(job="child", url="http://127.0.0.1:9", interval=60)
            code = 0 if parent._silent and fresh is not parent and fresh.pid == os.getpid() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert gpu_hook.current() is parent and not parent._silent
    gpu_hook.stop(flush=False)
    assert gpu_hook.current() is None
