"""Who may push training snapshots: a shared bearer token, or loopback only when none is configured.

The training hook runs on the same node as the exporter, so the safe default needs no setup: with no
token configured, POST /api/v1/training accepts loopback clients only (127.0.0.0/8, ::1) and refuses
everyone else with 403. With a token (``--ingest-token-file`` / ``GPU_EXPORTER_INGEST_TOKEN_FILE``,
or ``GPU_EXPORTER_INGEST_TOKEN``), every client, loopback included, must send
``Authorization: Bearer <token>``; the hook sends it from ``GPU_EXPORTER_TOKEN(_FILE)``.

The token is compared with ``hmac.compare_digest`` and is never logged, echoed in an error or put in
a repr.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from exporter.config import INGEST_TOKEN_ENV

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16  # shorter tokens work but are warned about: they can be guessed
MAX_TOKEN_BYTES = 4096


class IngestTokenError(Exception):
    """The configured token cannot be used (unreadable or empty file); the message names the source."""


def load_ingest_token(token_file: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> str | None:
    """The ingest token from ``token_file`` (wins) or the ``GPU_EXPORTER_INGEST_TOKEN`` variable.

    ``token_file`` is the value of --ingest-token-file (whose env twin the config layer resolves).
    Surrounding whitespace (the trailing newline of ``echo ... > file``) is stripped. Returns None when
    neither is set: ingest then accepts loopback clients only.
    """
    env = os.environ if env is None else env
    token: str | None = None
    source = ""
    if token_file:
        p = Path(token_file)
        try:
            raw = p.read_bytes()[: MAX_TOKEN_BYTES + 1]
        except OSError as exc:
            raise IngestTokenError(f"ingest token file {p}: cannot read: {exc.strerror or exc}") from exc
        if len(raw) > MAX_TOKEN_BYTES:
            raise IngestTokenError(f"ingest token file {p}: larger than {MAX_TOKEN_BYTES} bytes")
        try:
            token = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise IngestTokenError(f"ingest token file {p}: not UTF-8 text") from exc
        source = f"file {p}"
    elif env.get(INGEST_TOKEN_ENV) is not None:
        token = env[INGEST_TOKEN_ENV].strip()
        source = f"${INGEST_TOKEN_ENV}"
    if token is None:
        return None
    if not token:
        raise IngestTokenError(f"ingest token from {source} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise IngestTokenError(f"ingest token from {source} contains whitespace or control characters")
    if len(token) < MIN_TOKEN_LENGTH:
        log.warning("the ingest token from %s is shorter than %d characters", source, MIN_TOKEN_LENGTH)
    return token


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparseable."""
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


@dataclass(frozen=True)
class Denial:
    """Why a push was refused: HTTP status, a message for the client, and headers to send."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="gpu-exporter-ingest"'),)


class IngestAuthenticator:
    """Decides whether one request may push; see the module docstring for the policy."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode("utf-8") if token is not None else None

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def __repr__(self) -> str:  # never show the token
        return f"IngestAuthenticator(token_required={self.token_required})"

    def check(self, client_host: str | None, authorization: str | None) -> Denial | None:
        """None when allowed, else the Denial to answer with."""
        if self._token is None:
            if is_loopback(client_host):
                return None
            return Denial(
                403,
                "ingest from non-loopback clients needs a token: start the exporter with "
                "--ingest-token-file and give the hook GPU_EXPORTER_TOKEN_FILE",
            )
        if not authorization:
            return Denial(401, "missing bearer token", _CHALLENGE)
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return Denial(401, "expected Authorization: Bearer <token>", _CHALLENGE)
        offered = credentials.strip().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(offered, self._token):
            return Denial(
                401, "invalid bearer token", (("WWW-Authenticate", 'Bearer realm="gpu-exporter-ingest", error="invalid_token"'),)
            )
        return None
