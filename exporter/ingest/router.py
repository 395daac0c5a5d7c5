"""POST /api/v1/training: read the body within its limit, validate it, hand it to the store.

Authentication, rate limits and the body-size/read-time limits sit in front of it, in the pure ASGI
guard (exporter.ingest.guard), so a hostile push costs O(1) before FastAPI parses anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from exporter.hook.schema import INGEST_PATH, MAX_BODY_BYTES
from exporter.ingest.store import IngestStore
from exporter.ingest.validate import IngestError, parse_body

log = logging.getLogger(__name__)


def make_ingest_router(
    store: IngestStore, dependencies: Sequence[Any] = (), max_body_bytes: int = MAX_BODY_BYTES
) -> APIRouter:
    """FastAPI router with POST /api/v1/training.

    ``dependencies`` (FastAPI ``Depends(...)``) run before the body is read and may call
    ``store.count_rejected(reason)``. The exporter itself adds none: its authentication, rate limit
    and body limits run before routing, in exporter.ingest.guard.
    Answers 202 (accepted or stale), 400 (not JSON), 413 (too large), 422 (schema, with the field),
    429 (too many processes or jobs tracked: reason cardinality; over the series budget: series_budget).
    """
    router = APIRouter(dependencies=list(dependencies))

    @router.post(INGEST_PATH, status_code=202)
    async def ingest_training(request: Request) -> JSONResponse:
        try:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
                raise IngestError("too_large", f"body is {declared} bytes; the limit is {max_body_bytes}", 413)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise IngestError("too_large", f"body exceeds the limit of {max_body_bytes} bytes", 413)
            report = parse_body(bytes(body), max_body_bytes)
            outcome = store.submit(report)
        except IngestError as err:
            if err.status != 429:  # submit() counted its own refusals
                store.count_rejected(err.reason)
            log.debug("training push rejected (%s): %s", err.reason, err)
            return JSONResponse({"error": str(err), "reason": err.reason}, status_code=err.status)
        return JSONResponse({"status": outcome}, status_code=202)

    return router
