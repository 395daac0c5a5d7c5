"""The push format shared by the hook (which writes it) and exporter.ingest (which validates it).

Stdlib only, so both the training process and the server can import it. Every counter is cumulative
since the training process started: a lost, repeated or reordered push never corrupts a total, and an
exporter restart loses nothing. ``seq`` (monotonic per process) lets the exporter drop a push that
arrives after a newer one from the same process (same ``process_start_time``).
"""

from __future__ import annotations

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
)

# Cumulative counters (non-negative numbers) -> metric name (without host/job/... labels).
COUNTERS: dict[str, str] = {
    "steps": "training_steps_total",
    "step_duration_seconds_sum": "training_step_duration_seconds_sum",
    "data_wait_seconds": "training_data_wait_seconds_total",
    "compute_seconds": "training_compute_seconds_total",
    "samples": "training_samples_total",
    "tokens": "training_tokens_total",
    "nonfinite_loss": "training_nonfinite_loss_total",
    "cuda_alloc_retries": "training_cuda_alloc_retries_total",
    "cuda_oom": "training_cuda_oom_total",
}

# Gauges (numbers; absent or null = no series). Only ``loss`` may be NaN/Inf.
GAUGES: dict[str, str] = {
    "last_step_duration_seconds": "training_last_step_duration_seconds",
    "samples_per_second": "training_samples_per_second",
    "tokens_per_second": "training_tokens_per_second",
    "loss": "training_loss",
    "last_progress_timestamp_seconds": "training_last_progress_timestamp_seconds",
    "model_flops_utilization_ratio": "training_model_flops_utilization_ratio",
    "cuda_memory_allocated_bytes": "training_cuda_memory_allocated_bytes",
    "cuda_memory_reserved_bytes": "training_cuda_memory_reserved_bytes",
    "cuda_memory_max_allocated_bytes": "training_cuda_memory_max_allocated_bytes",
    "cuda_memory_max_reserved_bytes": "training_cuda_memory_max_reserved_bytes",
    "cuda_oom_last_requested_bytes": "training_cuda_oom_last_requested_bytes",
    "cuda_oom_last_free_bytes": "training_cuda_oom_last_free_bytes",
    "cuda_oom_last_timestamp_seconds": "training_cuda_oom_last_timestamp_seconds",
}
NONFINITE_ALLOWED = frozenset({"loss"})

# Per-service sections are bounded on both sides (the hook drops new services past this).
MAX_SERVICES = 32
MAX_LABEL_LENGTH = 128
MAX_BODY_BYTES = 64 * 1024
