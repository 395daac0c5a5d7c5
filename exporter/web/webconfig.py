"""The web-config file (TLS and basic auth for the HTTP endpoints), in the Prometheus exporter style.

Operators already write these files for node_exporter and friends (exporter-toolkit's
``--web.config.file``), so the same keys mean the same things here::

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional, default NoClientCert
      client_ca_file: ca.crt                         # needed by the two Verify* types
      min_version: TLS12                             # optional, default TLS12
    basic_auth_users:
      prometheus: $2b$12$...                         # bcrypt hash (htpasswd -nBC 12 prometheus)

The file is read once at start-up and checked strictly: an unknown key, a missing certificate, a key
that does not match the certificate or a value that is not a bcrypt hash stops the exporter with a
message naming the file and the key (``WebConfigError``), instead of serving something weaker than the
operator asked for.

Basic auth is enforced by exporter.web.basic_auth on every path except the liveness/readiness probes
(``/healthz``, ``/readyz``: they reveal nothing and kubelet probes carry no credentials) and the
ingest API (it has its own bearer token, see exporter.ingest.auth).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TOP_KEYS = ("tls_server_config", "basic_auth_users")
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")
# exporter-toolkit keys this exporter does not implement: named explicitly so the error says so,
# rather than "unknown key" for a key the operator copied from a working node_exporter config.
_TOOLKIT_UNSUPPORTED = {
    "http_server_config": "HTTP/2 and custom headers are not configurable here",
    "rate_limit": "use the exporter's --ingest-rate-limit for the ingest API",
    "cipher_suites": "Python's TLS stack chooses cipher suites; set min_version instead",
    "curve_preferences": "Python's TLS stack chooses curves",
    "prefer_server_cipher_suites": "Python's TLS stack always prefers the server's order",
    "client_allowed_sans": "restrict clients with client_ca_file instead",
    "cert": "inline certificates are not supported; use cert_file",
    "key": "inline keys are not supported; use key_file",
}
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit's names → what Python's ssl module can do. The two "request without verifying"
# types have no equivalent: Python verifies every client certificate it asks for.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_CLIENT_AUTH_UNSUPPORTED = ("RequestClientCert", "RequireAnyClientCert")
_BCRYPT_RE = re.compile(r"^\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}$")


class WebConfigError(Exception):
    """The web-config file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class TlsServerConfig:
    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A server context with these settings (raises ssl.SSLError / OSError on bad files)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        ctx.minimum_version = _TLS_VERSIONS[self.min_version]
        if self.max_version is not None:
            ctx.maximum_version = _TLS_VERSIONS[self.max_version]
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=str(self.client_ca_file))
        return ctx


@dataclass(frozen=True)
class WebConfig:
    path: Path | None = None
    tls: TlsServerConfig | None = None
    # user -> bcrypt hash
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)


def _err(path: Path, key: str, problem: str) -> WebConfigError:
    return WebConfigError(f"web config {path}: {key}: {problem}")


def _check_keys(path: Path, where: str, data: Mapping[Any, Any], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in data:
        name = f"{where}.{key}" if where else str(key)
        if not isinstance(key, str):
            raise _err(path, name, "keys must be strings")
        if key in _TOOLKIT_UNSUPPORTED:
            raise _err(path, name, f"not supported by this exporter ({_TOOLKIT_UNSUPPORTED[key]})")
        if key not in allowed:
            raise _err(path, name, f"unknown key (expected one of: {', '.join(allowed)})")


def _file(path: Path, key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _err(path, key, "expected a file path")
    p = Path(value)
    if not p.is_absolute():
        p = path.parent / p
    if not p.is_file():
        raise _err(path, key, f"file {p} does not exist")
    if not os.access(p, os.R_OK):
        raise _err(path, key, f"file {p} is not readable")
    return p


def _parse_tls(path: Path, raw: Any) -> TlsServerConfig:
    if not isinstance(raw, Mapping):
        raise _err(path, "tls_server_config", "expected a mapping")
    _check_keys(path, "tls_server_config", raw, _TLS_KEYS)
    for key in ("cert_file", "key_file"):
        if key not in raw:
            raise _err(path, f"tls_server_config.{key}", "required when tls_server_config is given")
    cert = _file(path, "tls_server_config.cert_file", raw["cert_file"])
    key_file = _file(path, "tls_server_config.key_file", raw["key_file"])

    auth = raw.get("client_auth_type", "NoClientCert")
    if auth in _CLIENT_AUTH_UNSUPPORTED:
        raise _err(
            path,
            "tls_server_config.client_auth_type",
            f"{auth} is not supported (Python verifies every client certificate it requests); "
            "use VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file",
        )
    if auth not in _CLIENT_AUTH:
        raise _err(
            path, "tls_server_config.client_auth_type", f"{auth!r} is not one of {', '.join(_CLIENT_AUTH)}"
        )
    ca: Path | None = None
    if raw.get("client_ca_file") is not None:
        ca = _file(path, "tls_server_config.client_ca_file", raw["client_ca_file"])
    if auth != "NoClientCert" and ca is None:
        raise _err(path, "tls_server_config.client_ca_file", f"required with client_auth_type {auth}")

    versions: dict[str, str | None] = {}
    for key, default in (("min_version", "TLS12"), ("max_version", None)):
        value = raw.get(key, default)
        if value is not None and value not in _TLS_VERSIONS:
            raise _err(path, f"tls_server_config.{key}", f"{value!r} is not one of {', '.join(_TLS_VERSIONS)}")
        versions[key] = value
    min_v, max_v = versions["min_version"] or "TLS12", versions["max_version"]
    if max_v is not None and _TLS_VERSIONS[max_v] < _TLS_VERSIONS[min_v]:
        raise _err(path, "tls_server_config.max_version", f"{max_v} is below min_version {min_v}")

    tls = TlsServerConfig(cert, key_file, auth, ca, min_v, max_v)
    try:
        tls.ssl_context()  # fail now, with the file named, rather than at the first connection
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise _err(path, "tls_server_config", f"cannot load certificate/key/CA: {exc}") from exc
    return tls


def _parse_users(path: Path, raw: Any) -> dict[str, bytes]:
    if not isinstance(raw, Mapping):
        raise _err(path, "basic_auth_users", "expected a mapping of user name to bcrypt hash")
    users: dict[str, bytes] = {}
    for user, hashed in raw.items():
        key = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            raise _err(path, key, "user names must be non-empty strings without ':'")
        if not isinstance(hashed, str) or not _BCRYPT_RE.match(hashed):
            # never echo the value: it may be a plaintext password pasted by mistake
            raise _err(path, key, "expected a bcrypt hash ($2b$...; e.g. from `htpasswd -nBC 12 USER`)")
        users[user] = hashed.encode("ascii")
    return users


def parse_web_config(data: Any, path: Path) -> WebConfig:
    """Validate already-parsed YAML; ``path`` is used for messages and relative file paths."""
    if data is None:
        return WebConfig(path=path)
    if not isinstance(data, Mapping):
        raise _err(path, "(top level)", "expected a mapping")
    _check_keys(path, "", data, _TOP_KEYS)
    tls = _parse_tls(path, data["tls_server_config"]) if data.get("tls_server_config") is not None else None
    users = _parse_users(path, data["basic_auth_users"]) if data.get("basic_auth_users") is not None else {}
    return WebConfig(path=path, tls=tls, basic_auth_users=users)


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate a web-config file; raises WebConfigError with a message for the operator."""
    import yaml  # server-side dependency; imported here so the module stays cheap to import

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise WebConfigError(f"web config {p}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise WebConfigError(f"web config {p}: not UTF-8 text: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WebConfigError(f"web config {p}: invalid YAML: {exc}") from exc
    return parse_web_config(data, p)
