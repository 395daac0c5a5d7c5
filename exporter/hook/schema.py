"""The push format shared by the hook (which writes it) and exporter.ingest (which validates it).

Stdlib only, so both the training process and the server can import it. Every counter is cumulative
since the training process started: a lost, repeated or reordered push never corrupts a total, and an
exporter restart loses nothing. ``seq`` (monotonic per process) lets the exporter drop a push that
arrives after a newer one from the same process (same ``process_start_time``).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1
INGEST_PATH = "/api/v1/training"

# Identity keys (all strings except pid / pid_namespace_inode, which are ints).
IDENTITY_STR_KEYS = (
    "hostname",
    "training_job",
    "rank",
    "local_rank",
    "world_size",
    "device",
    "torch_version",
    "framework",
    # Only under Slurm (SLURM_JOB_ID / SLURM_PROCID); "" when absent.
    "slurm_job",
    "slurm_procid",
)

@dataclass(frozen=True)
class Figure:
    """One training figure, named once: its key in a push, its metric, the metric type and help text,
    and the ``Monitor`` attribute that records it (None: computed while the push is built)."""

    key: str
    metric: str
    kind: str  # "counter" (cumulative, non-negative) or "gauge" (absent or null = no series)
    help: str
    recorded_as: str | None = None


FIGURES: tuple[Figure, ...] = (
    Figure("steps", "training_steps_total", "counter",
           "Optimizer steps completed by this training process", "steps"),
    # Rendered with ``steps`` as the summary training_step_duration_seconds (its _sum), not as a counter.
    Figure("step_duration_seconds_sum", "training_step_duration_seconds_sum", "counter",
           "Wall time per step", "step_seconds"),
    Figure("data_wait_seconds", "training_data_wait_seconds_total", "counter",
           "Time spent waiting for the next batch", "data_wait_seconds"),
    Figure("compute_seconds", "training_compute_seconds_total", "counter",
           "Time between batch arrival and step end (straggler detection under DDP)", "compute_seconds"),
    Figure("samples", "training_samples_total", "counter", "Samples processed", "samples"),
    Figure("tokens", "training_tokens_total", "counter", "Tokens processed", "tokens"),
    Figure("nonfinite_loss", "training_nonfinite_loss_total", "counter", "NaN/Inf losses seen", "nonfinite_loss"),
    Figure("cuda_alloc_retries", "training_cuda_alloc_retries_total", "counter",
           "CUDA caching-allocator retries (cache flush and retry)"),
    Figure("cuda_oom", "training_cuda_oom_total", "counter",
           "CUDA out-of-memory errors, including ones the training code caught", "ooms"),
    Figure("last_step_duration_seconds", "training_last_step_duration_seconds", "gauge",
           "Duration of the most recent step", "last_step_seconds"),
    Figure("samples_per_second", "training_samples_per_second", "gauge",
           "Recent sample throughput (hook-side moving window)"),
    Figure("tokens_per_second", "training_tokens_per_second", "gauge",
           "Recent token throughput (hook-side moving window)"),
    Figure("loss", "training_loss", "gauge", "Last sampled loss (read without forcing a device sync)", "loss"),
    Figure("last_progress_timestamp_seconds", "training_last_progress_timestamp_seconds", "gauge",
           "Unix time of the last completed step", "last_progress_time"),
    Figure("model_flops_utilization_ratio", "training_model_flops_utilization_ratio", "gauge",
           "Model FLOPs utilization, when the job gives FLOPs per step"),
    Figure("cuda_memory_allocated_bytes", "training_cuda_memory_allocated_bytes", "gauge",
           "CUDA caching allocator: bytes allocated now"),
    Figure("cuda_memory_reserved_bytes", "training_cuda_memory_reserved_bytes", "gauge",
           "CUDA caching allocator: bytes reserved now"),
    Figure("cuda_memory_max_allocated_bytes", "training_cuda_memory_max_allocated_bytes", "gauge",
           "CUDA caching allocator: peak bytes allocated"),
    Figure("cuda_memory_max_reserved_bytes", "training_cuda_memory_max_reserved_bytes", "gauge",
           "CUDA caching allocator: peak bytes reserved"),
    Figure("cuda_oom_last_requested_bytes", "training_cuda_oom_last_requested_bytes", "gauge",
           "Size requested by the last failed CUDA allocation", "oom_last_requested"),
    Figure("cuda_oom_last_free_bytes", "training_cuda_oom_last_free_bytes", "gauge",
           "Device free memory at the last CUDA OOM", "oom_last_free"),
    Figure("cuda_oom_last_timestamp_seconds", "training_cuda_oom_last_timestamp_seconds", "gauge",
           "Unix time of the last CUDA OOM", "oom_last_time"),
    Figure("invalid_values", "training_hook_invalid_values_total", "counter",
           "Values the hook's calls were given and dropped (non-finite or wrong type)", "invalid_values"),
    # issue 16: progress and waits (exporter.hook.collectives, exporter.hook.monitor)
    Figure("collective_wait_seconds", "training_collective_wait_seconds_total", "counter",
           "Time steps waited for the other ranks in collectives (DDP all-reduce and buffer broadcast); "
           "step time minus this is the rank's own work"),
    Figure("step_index", "training_step_index", "gauge", "Steps begun by this process (failed ones included)",
           "step_index"),
    Figure("phase_start_timestamp_seconds", "training_phase_start_timestamp_seconds", "gauge",
           "Unix time the training thread entered its current phase"),
)
# Keys every exporter since schema 1 accepts: the figures listed before ``invalid_values`` (add new
# figures after it). A hook whose push was refused as invalid (e.g. a newer hook against an older
# exporter) sends only these until a full push is accepted again.
CORE_KEYS = frozenset(f.key for f in FIGURES[: [f.key for f in FIGURES].index("invalid_values")])
FIGURE_BY_KEY = {f.key: f for f in FIGURES}
# Wire key -> metric name, per type (what the validator accepts and the collector renders).
COUNTERS: dict[str, str] = {f.key: f.metric for f in FIGURES if f.kind == "counter"}
GAUGES: dict[str, str] = {f.key: f.metric for f in FIGURES if f.kind == "gauge"}
# Only ``loss`` may be NaN/Inf.
NONFINITE_ALLOWED = frozenset({"loss"})

# --- issue 16: progress and exits (top-level keys of a push)
# "phase": what the training thread is doing now (gauge training_phase{phase}, a state set).
PHASES = ("between_steps", "data", "compute", "collective", "checkpoint")
# "exit": {"reason", "detail", "timestamp"} in the last push; "vanished" is the exporter's own verdict
# for a reporting PID that disappeared without one.
EXIT_REASONS = ("normal", "exception", "signal")
EXIT_VANISHED = "vanished"
# "push_interval_seconds": the sender's period, so the exporter knows when silence means trouble.
# "gpu_uuid": the CUDA device's UUID (only once CUDA is initialised), so an OOM is tied to its GPU.

# --- issue 16: progress and exits (top-level keys of a push)
# "phase": what the training thread is doing now (gauge training_phase{phase}, a state set).
PHASES = ("between_steps", "data", "compute", "collective", "checkpoint")
# "exit": {"reason", "detail", "timestamp"} in the last push; "vanished" is the exporter's own verdict
# for a reporting PID that disappeared without one.
EXIT_REASONS = ("normal", "exception", "signal")
EXIT_VANISHED = "vanished"
# "push_interval_seconds": the sender's period, so the exporter knows when silence means trouble.
# "gpu_uuid": the CUDA device's UUID (only once CUDA is initialised), so an OOM is tied to its GPU.

# Per-service sections are bounded on both sides (the hook drops new services past this).
MAX_SERVICES = 32
MAX_LABEL_LENGTH = 128
MAX_BODY_BYTES = 64 * 1024

# The most series one push can add to /metrics (training_info, last_seen, the step-duration summary's
# _sum and _count, every other counter and gauge, the phase state set and the exit, then per service:
# an auth failure count, a token expiry, quota remaining and limit): the default per-process series
# budget (exporter.ingest.store). What the exporter learns about a process (its GPU, OOM co-tenants)
# is counted in the series in use but never refused.
MAX_SERIES_PER_PROCESS = 4 + (len(COUNTERS) - 1) + len(GAUGES) + len(PHASES) + 1 + 4 * MAX_SERVICES
