"""Recognise authentication failures and token lifetimes without importing any client library.

The training job may use requests, httpx, urllib, huggingface_hub or botocore; the hook must not
import them (they may not be installed, and importing them costs start-up time). Everything here is
duck-typed on exception attributes and class names, so an unknown exception simply is not an auth
failure.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

# Exception class names (any module) that mean "your credentials were refused".
_HF_AUTH_NAMES = frozenset({"GatedRepoError", "RepositoryNotFoundError", "HfHubHTTPError"})
_BOTOCORE_EXPIRED_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "InvalidToken",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
    }
)
_BOTOCORE_EXPIRED_NAMES = frozenset({"TokenRetrievalError", "NoCredentialsError", "UnauthorizedSSOTokenError"})


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim (Unix seconds) of a JWT, or None when the token is not a JWT or has none.

    The signature is not verified: the hook only wants to know when the token stops working.
    """
    try:
        parts = token.strip().split(".")
        if len(parts) < 2:
            return None
        body = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(body.encode("ascii")))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            return float(exp)
    except (ValueError, binascii.Error, UnicodeError, TypeError):
        return None
    return None


def _status_of(obj: Any) -> int | None:
    for attr in ("status_code", "status", "code"):
        value = getattr(obj, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    return None


def auth_status(exc: BaseException) -> str | None:
    """The status to record if ``exc`` is an authentication/authorization failure, else None.

    Returns "401" / "403" for HTTP refusals (requests/httpx ``exc.response.status_code``, urllib's
    ``HTTPError.code``, huggingface_hub errors carrying a response), and "expired_token" (or the AWS
    error code) for botocore credential errors.
    """
    try:
        response = getattr(exc, "response", None)
        # botocore ClientError: response is a dict {"Error": {"Code": ...}, "ResponseMetadata": {...}}
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code") or "")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in _BOTOCORE_EXPIRED_CODES:
                return "expired_token" if "Expired" in code else code
            if status in (401, 403):
                return str(status)
            return None
        if type(exc).__name__ in _BOTOCORE_EXPIRED_NAMES:
            return "expired_token"
        status = _status_of(response) if response is not None else None
        if status is None:
            status = _status_of(exc)  # urllib.error.HTTPError.code, custom errors
        if status in (401, 403):
            return str(status)
        if type(exc).__name__ in _HF_AUTH_NAMES and status is None and "401" in str(exc):
            return "401"
    except Exception:
        return None
    return None


def auth_status_from_response(response: Any) -> str | None:
    """The status to record for an HTTP response object (requests/httpx/urllib), or None if not 401/403."""
    try:
        status = _status_of(response)
        if status is None:
            getcode = getattr(response, "getcode", None)
            status = getcode() if callable(getcode) else None
    except Exception:
        return None
    return str(status) if status in (401, 403) else None
