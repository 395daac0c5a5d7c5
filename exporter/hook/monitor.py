"""The in-process recorder: what the training thread touches on every step.

Everything the training thread calls is O(1), allocation-light and bounded: a few ``perf_counter``
reads and additions under a lock that is never held across I/O (the sender thread only copies the
fields under it). Nothing here raises into training code: every public method swallows and logs
its own errors once.

Every number or name a public call takes is checked first (exporter.hook.values): one bad argument is
dropped and counted, and can never make every later push invalid.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

from exporter.attribution.procfs import namespace_inode
from exporter.hook import auth as _auth
from exporter.hook import cuda as _cuda
from exporter.hook import progress as _progress
from exporter.hook.progress import BETWEEN_STEPS, COMPUTE, DATA
from exporter.hook.schema import FIGURES, MAX_SERVICES, SCHEMA_VERSION
from exporter.hook.values import CheckedInputs, drop_unsendable, label, status_label

log = logging.getLogger("exporter.hook")

_perf = time.perf_counter
# (wire key, Monitor attribute) of the figures recorded here; the rest are computed in build_payload.
_RECORDED_COUNTERS = tuple((f.key, f.recorded_as) for f in FIGURES if f.kind == "counter" and f.recorded_as)
_RECORDED_GAUGES = tuple((f.key, f.recorded_as) for f in FIGURES if f.kind == "gauge" and f.recorded_as)


def _pid_namespace_inode() -> int | None:
    """Inode of this process's PID namespace: lets the exporter map our PID to the host's."""
    try:
        return namespace_inode(os.readlink("/proc/self/ns/pid"))  # "pid:[4026531836]"
    except OSError:
        return None


_INF = math.inf


class _StepContext:
    """``with mon.step(...)``: one reusable object, so entering a step allocates nothing."""

    __slots__ = ("_mon",)

    def __init__(self, mon: Monitor) -> None:
        self._mon = mon

    def __enter__(self) -> Monitor:
        self._mon.step_begin()
        return self._mon

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        mon = self._mon
        if exc is None:
            mon.step_end(mon._ctx_samples, mon._ctx_tokens)
        else:
            mon._step_failed(exc)
        # never swallow the exception: the training code decides what an error means


class Monitor(CheckedInputs, _progress.Progress):
    """Records one training process's progress; a sender thread ships it to the exporter.

    Create it with :func:`exporter.hook.start`. All methods are safe to call from the training thread
    at any rate; none performs I/O, touches the GPU synchronously, or raises.
    """

    def __init__(
        self,
        job: str,
        *,
        rank: int | str | None = None,
        local_rank: int | str | None = None,
        world_size: int | str | None = None,
        framework: str = "plain",
        device: int | None = None,
        loss_every: int = 10,
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        env = os.environ
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.job = label(job) or "python"  # the exporter requires a job name
        # srun without torchrun sets only SLURM_PROCID: it is the rank then.
        self.rank = label(rank if rank is not None else env.get("RANK", env.get("SLURM_PROCID", "0")))
        # Sent only under Slurm, so a push outside Slurm is unchanged (exporter.attribution joins it).
        self.slurm = {k: label(env[v]) for k, v in (("slurm_job", "SLURM_JOB_ID"), ("slurm_procid", "SLURM_PROCID")) if v in env}
        self.local_rank = label(local_rank if local_rank is not None else env.get("LOCAL_RANK", "0"))
        self.world_size = label(world_size if world_size is not None else env.get("WORLD_SIZE", "1"))
        self.framework = label(framework)
        self.pid = os.getpid()
        self.pid_namespace_inode = _pid_namespace_inode()
        self.hostname = label(socket.gethostname())
        self.start_time = time.time()
        self.loss_every = max(1, int(loss_every))
        self.invalid_values = 0
        self.flops_per_step = self._number(flops_per_step, "flops_per_step", optional=True)
        self.peak_flops = self._number(peak_flops, "peak_flops", optional=True)
        self._device = device
        if self._device is None:
            try:
                self._device = int(self.local_rank)
            except ValueError:
                self._device = 0

        self._ctx = _StepContext(self)
        self._ctx_samples: float | None = None
        self._ctx_tokens: float | None = None
        # step timing (perf_counter seconds)
        self._t_begin: float | None = None
        self._t_data: float | None = None
        self._t_prev_end: float | None = None
        self._init_progress()  # issue 16: phase, step index, collective waits, exit (exporter.hook.progress)
        # cumulative counters
        self.steps = 0
        self.step_seconds = 0.0
        self.data_wait_seconds = 0.0
        self.compute_seconds = 0.0
        self.samples = 0.0
        self.tokens = 0.0
        self.nonfinite_loss = 0
        self.ooms = 0
        self._observer_ooms_unclaimed = 0
        self.oom_last_requested: float | None = None
        self.oom_last_free: float | None = None
        self.oom_last_time: float | None = None
        # gauges
        self.last_step_seconds: float | None = None
        self.last_progress_time: float | None = None
        self.loss: float | None = None
        self._loss_calls = 0
        self._loss_sampler: _cuda.LossSampler | None = None
        # auth / quota, bounded by MAX_SERVICES entries each
        self.auth_failures: dict[tuple[str, str], int] = {}
        self.token_expiry: dict[str, float] = {}
        self.api_quota: dict[str, tuple[float, float | None]] = {}
        # sender-side state
        self._seq = 0
        self._rate_window: deque[tuple[float, int, float, float]] = deque(maxlen=8)
        self._observer_attached = False
        self._silent = False  # set in a forked child: record, never send

    # ----------------------------------------------------------------- step timing (hot path)
    def step(self, samples: float | None = None, tokens: float | None = None) -> _StepContext:
        """Context manager around one optimizer step: ``with mon.step(samples=len(batch)): ...``.

        Without :meth:`data_ready`, the time since the previous step ended counts as data wait (the
        loader ran between the two ``with`` blocks) and the block itself as compute.
        """
        self._ctx_samples = samples
        self._ctx_tokens = tokens
        return self._ctx

    def step_begin(self) -> None:
        """Mark the start of a step (before fetching its batch when using :meth:`data_ready`)."""
        t = self._t_begin = _perf()
        self._t_data = None
        self.step_index += 1
        self.phase, self.phase_since = (DATA if self._uses_data_ready else COMPUTE), t

    def data_ready(self) -> None:
        """Mark that this step's batch has arrived: splits data wait from compute."""
        t = self._t_data = _perf()
        self._uses_data_ready = True
        self.phase, self.phase_since = COMPUTE, t

    def step_end(self, samples: float | None = None, tokens: float | None = None) -> None:
        """Mark a completed step; ``samples``/``tokens`` processed in it feed the throughput gauges."""
        now = _perf()
        begin = self._t_begin
        if begin is None:  # step_end without step_begin: measure from the previous end
            begin = self._t_prev_end if self._t_prev_end is not None else now
        data = self._t_data
        if data is not None and data >= begin:
            wait = data - begin
            compute = now - data
        else:
            prev = self._t_prev_end
            wait = begin - prev if prev is not None and begin >= prev else 0.0
            compute = now - begin
        duration = wait + compute
        # Plain non-negative finite numbers take the fast path (NaN fails both comparisons).
        if samples is not None and not ((type(samples) is int or type(samples) is float) and 0 <= samples < _INF):
            samples = self._number(samples, "samples", nonneg=True)
        if tokens is not None and not ((type(tokens) is int or type(tokens) is float) and 0 <= tokens < _INF):
            tokens = self._number(tokens, "tokens", nonneg=True)
        launch = self._coll_launch  # watch_ddp: own gradients done at `launch`, DDP's wait over at `_coll_done`
        coll = self._coll_extra + (self._coll_done - launch if launch is not None and self._coll_done > launch else 0.0)
        if coll:
            self._coll_launch, self._coll_extra = None, 0.0
            coll = min(coll, compute)
        with self._lock:
            self.steps += 1
            self.step_seconds += duration
            self.data_wait_seconds += wait
            self.compute_seconds += compute
            self.collective_wait_seconds += coll
            if samples:
                self.samples += samples
            if tokens:
                self.tokens += tokens
            self.last_step_seconds = duration
            self.last_progress_time = time.time()
        self._t_prev_end = now
        self._t_begin = None
        self._t_data = None
        self._step_exc, self.phase, self.phase_since = None, (BETWEEN_STEPS if self._uses_data_ready else DATA), now

    def _step_failed(self, exc: BaseException) -> None:
        """A step raised: count OOMs (even if the caller catches them), never count the step."""
        self._t_begin = None
        self._t_data = None
        self._coll_launch, self._coll_extra = None, 0.0
        t = self._t_prev_end = _perf()
        self.phase, self.phase_since = (BETWEEN_STEPS if self._uses_data_ready else DATA), t
        try:
            self._step_exc = label(type(exc).__name__)
            if _cuda.is_oom_exception(exc):
                self.record_oom_exception(exc)
        except Exception:
            self._warn_once("step_failed", "could not classify a step's exception")

    # ----------------------------------------------------------------- loss
    def observe_loss(self, loss: Any) -> None:
        """Record the loss: a Python number every call; a CPU tensor every call (``.item()`` is host
        memory); a CUDA tensor every ``loss_every`` calls through an async copy that never syncs the
        device (the value appears once the GPU has produced it). Non-finite values are counted."""
        try:
            if isinstance(loss, (float, int)) and not isinstance(loss, bool):
                self._set_loss(float(loss))
                return
            device = getattr(loss, "device", None)
            kind = getattr(device, "type", None)
            if kind == "cpu":
                self._set_loss(float(loss.detach().item()))
                return
            self._loss_calls += 1
            if kind == "cuda":
                sampler = self._loss_sampler
                if sampler is None:
                    sampler = self._loss_sampler = _cuda.LossSampler()
                value = sampler.poll()
                if value is not None:
                    self._set_loss(value)
                if self._loss_calls % self.loss_every == 1 or self.loss_every == 1:
                    sampler.offer(loss)
            elif self._loss_calls % self.loss_every == 1 or self.loss_every == 1:
                self._set_loss(float(loss.detach().item()))  # other devices: sampled, may sync
        except Exception as exc:
            with self._lock:
                self.invalid_values += 1
            self._warn_once("loss", f"could not read the loss ({exc!r}); pass a float instead")

    def _set_loss(self, value: float) -> None:
        self.loss = value
        if not math.isfinite(value):
            with self._lock:
                self.nonfinite_loss += 1

    # ----------------------------------------------------------------- OOM
    def record_oom_exception(self, exc: BaseException) -> None:
        """Count an OOM exception (the step context calls this; call it yourself for OOMs outside a
        step). Deduplicated against the CUDA allocator's observer, which sees the same OOM first."""
        requested, free = _cuda.parse_oom_message(str(exc))
        with self._lock:
            if self._observer_ooms_unclaimed > 0:
                self._observer_ooms_unclaimed -= 1  # already counted by the observer
                return
            self.ooms += 1
            self.oom_last_time = time.time()
            self.oom_last_requested = float(requested) if requested is not None else None
            self.oom_last_free = float(free) if free is not None else None

    def record_oom(self, requested_bytes: float | None = None, free_bytes: float | None = None) -> None:
        """Count an OOM you detected yourself (not deduplicated)."""
        requested_bytes = self._number(requested_bytes, "requested_bytes", nonneg=True, optional=True)
        free_bytes = self._number(free_bytes, "free_bytes", nonneg=True, optional=True)
        with self._lock:
            self.ooms += 1
            self.oom_last_time = time.time()
            self.oom_last_requested = requested_bytes
            self.oom_last_free = free_bytes

    def _on_cuda_oom(self, device: int, requested: int, device_allocated: int, device_free: int) -> None:
        """CUDA allocator OOM observer: runs inside the allocator, so it must never raise."""
        try:
            with self._lock:
                self.ooms += 1
                self._observer_ooms_unclaimed = min(self._observer_ooms_unclaimed + 1, 1000)
                self.oom_last_time = time.time()
                self.oom_last_requested = float(requested)
                self.oom_last_free = float(device_free)
        except BaseException:
            pass

    # ----------------------------------------------------------------- auth / tokens / quota
    def record_auth_failure(self, service: str, status_code: int | str = "401") -> None:
        """Count one authentication/authorization failure for ``service`` (e.g. "hf_hub", "s3")."""
        try:
            svc = self._service(service, "service")
            if svc is None:
                return
            code = status_label(status_code)
            if code is None:
                self._invalid("status_code", status_code)
                return
            key = (svc, code)
            with self._lock:
                if key in self.auth_failures or len(self.auth_failures) < MAX_SERVICES:
                    self.auth_failures[key] = self.auth_failures.get(key, 0) + 1
        except Exception:
            self._warn_once("auth", "could not record an auth failure")

    def record_exception(self, service: str, exc: BaseException) -> bool:
        """Record ``exc`` if it is an auth failure (401/403, expired cloud token); True if it was."""
        status = _auth.auth_status(exc)
        if status is None:
            return False
        self.record_auth_failure(service, status)
        return True

    def record_response(self, service: str, response: Any) -> bool:
        """Record an HTTP response (requests/httpx/urllib) if it is a 401/403; True if it was."""
        status = _auth.auth_status_from_response(response)
        if status is None:
            return False
        self.record_auth_failure(service, status)
        return True

    def set_token_expiry(self, service: str, expires_at: float | None) -> None:
        """Declare when ``service``'s token expires (Unix seconds); None forgets it."""
        try:
            svc = self._service(service, "service")
            expiry = self._number(expires_at, "expires_at", optional=True)
            if svc is None or (expiry is None and expires_at is not None):
                return
            with self._lock:
                if expiry is None:
                    self.token_expiry.pop(svc, None)
                elif svc in self.token_expiry or len(self.token_expiry) < MAX_SERVICES:
                    self.token_expiry[svc] = expiry
        except Exception:
            self._warn_once("expiry", "could not record a token expiry")

    def set_token(self, service: str, token: str) -> float | None:
        """Declare a JWT for ``service``: its ``exp`` claim becomes the token expiry. Returns it."""
        expiry = _auth.jwt_expiry(token)
        if expiry is not None:
            self.set_token_expiry(service, expiry)
        return expiry

    def set_api_quota(self, service: str, remaining: float, limit: float | None = None) -> None:
        """Report the remaining (and total) API quota of ``service``."""
        try:
            svc = self._service(service, "service")
            left = self._number(remaining, "remaining")
            total = self._number(limit, "limit", optional=True)
            if svc is None or left is None or (total is None and limit is not None):
                return
            with self._lock:
                if svc in self.api_quota or len(self.api_quota) < MAX_SERVICES:
                    self.api_quota[svc] = (left, total)
        except Exception:
            self._warn_once("quota", "could not record an API quota")

    # ----------------------------------------------------------------- sender side
    def build_payload(self) -> dict[str, Any]:
        """A cumulative snapshot to push (called by the sender thread, never by training code)."""
        if not self._observer_attached and _cuda.cuda_initialized():
            self._observer_attached = True  # one attempt: a failure is logged at debug level
            _cuda.attach_oom_observer(self._on_cuda_oom)
        mem = _cuda.memory_stats(self._device)
        now_mono = time.monotonic()
        with self._lock:
            self._seq += 1
            seq = self._seq
            counters: dict[str, float] = {key: getattr(self, attr) for key, attr in _RECORDED_COUNTERS}
            gauges: dict[str, float | None] = {key: getattr(self, attr) for key, attr in _RECORDED_GAUGES}
            auth = [
                {"service": s, "status_code": c, "count": n} for (s, c), n in self.auth_failures.items()
            ]
            expiry = dict(self.token_expiry)
            quota = {s: {"remaining": r, "limit": lim} for s, (r, lim) in self.api_quota.items()}
        if mem is not None:
            # The allocator's own OOM count includes OOMs raised before the observer was attached.
            counters["cuda_oom"] = max(counters["cuda_oom"], mem.pop("cuda_oom", 0.0))
            counters["cuda_alloc_retries"] = mem.pop("cuda_alloc_retries", 0.0)
            gauges.update(mem)
        self._rate_window.append((now_mono, int(counters["steps"]), counters["samples"], counters["tokens"]))
        t0, steps0, samples0, tokens0 = self._rate_window[0]
        dt = now_mono - t0
        if dt > 0:
            gauges["samples_per_second"] = (counters["samples"] - samples0) / dt
            gauges["tokens_per_second"] = (counters["tokens"] - tokens0) / dt
            if self.flops_per_step and self.peak_flops:
                steps_per_s = (counters["steps"] - steps0) / dt
                gauges["model_flops_utilization_ratio"] = self.flops_per_step * steps_per_s / self.peak_flops
        extra = _progress.payload_fields(self, counters, gauges)
        # Last line of defence (allocator stats, a rate over a clock jump): nothing non-finite leaves.
        for key, value in drop_unsendable(counters, gauges):
            self._invalid(key, value)
        torch = _cuda.torch_module()
        return {
            "schema": SCHEMA_VERSION,
            "seq": seq,
            "process_start_time": self.start_time,
            "sent_at": time.time(),
            "identity": {
                "hostname": self.hostname,
                "training_job": self.job,
                "rank": self.rank,
                "local_rank": self.local_rank,
                "world_size": self.world_size,
                "pid": self.pid,
                "pid_namespace_inode": self.pid_namespace_inode,
                "device": self._device_name(),
                "torch_version": label(getattr(torch, "__version__", "")) if torch is not None else "",
                "framework": self.framework,
                **self.slurm,
            },
            "counters": counters,
            "gauges": {k: v for k, v in gauges.items() if v is not None},
            "auth_failures": auth,
            "token_expiry": expiry,
            "api_quota": quota,
            **extra,
        }

    def _device_name(self) -> str:
        return f"cuda:{self._device}" if _cuda.cuda_initialized() else "cpu"

    def _after_fork_in_child(self) -> None:
        """In a forked child (DataLoader worker): fresh lock, stay silent, never send."""
        self._lock = threading.Lock()
        self._silent = True
