"""The environment variables the training hook reads, owned here: the hook reads them, the exporter's
settings (exporter.config) accept them as known, the docs list them. Standard library only."""

from __future__ import annotations

URL_ENV = "GPU_EXPORTER_URL"  # exporter base URL (pushes go to INGEST_PATH below it)
JOB_ENV = "GPU_EXPORTER_JOB"  # training_job label (default: the script name)
TOKEN_ENV = "GPU_EXPORTER_TOKEN"  # bearer token for the exporter's ingest
TOKEN_FILE_ENV = "GPU_EXPORTER_TOKEN_FILE"  # the same, read from a file (TOKEN_ENV wins)
PUSH_INTERVAL_ENV = "GPU_EXPORTER_PUSH_INTERVAL"  # seconds between pushes
HOOK_ENV = "GPU_EXPORTER_HOOK"  # "0" records in memory but sends nothing

HOOK_ENV_NAMES = frozenset({URL_ENV, JOB_ENV, TOKEN_ENV, TOKEN_FILE_ENV, PUSH_INTERVAL_ENV, HOOK_ENV})
