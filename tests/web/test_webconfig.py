"""The web-config file (TLS, basic-auth users): strict parsing, errors that name file and key."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from exporter.web.webconfig import WebConfigError, load_web_config
from harness.security import HASH, write


def test_web_config_full_file_loads(tmp_path: Path, pki: dict[str, Path]) -> None:
    cfg = load_web_config(
        write(
            tmp_path,
            f"""
tls_server_config:
  cert_file: {pki['server_crt']}
  key_file: {pki['server_key']}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki['ca_crt']}
  min_version: TLS13
basic_auth_users:
  prometheus: '{HASH}'
""",
        )
    )
    assert cfg.tls is not None
    assert cfg.tls.client_auth_type == "RequireAndVerifyClientCert"
    ctx = cfg.tls.ssl_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert set(cfg.basic_auth_users) == {"prometheus"}


def test_web_config_relative_paths_resolve_against_the_file(tmp_path: Path, pki: dict[str, Path]) -> None:
    for k in ("server_crt", "server_key"):
        (tmp_path / pki[k].name).write_bytes(pki[k].read_bytes())
    cfg = load_web_config(write(tmp_path, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"))
    assert cfg.tls is not None and cfg.tls.cert_file == tmp_path / "server.crt"
    assert cfg.tls.min_version == "TLS12"


def test_web_config_empty_file_means_nothing_enabled(tmp_path: Path) -> None:
    cfg = load_web_config(write(tmp_path, ""))
    assert cfg.tls is None and not cfg.basic_auth_users


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tls_server_config:\n  cert_fil: x\n", "tls_server_config.cert_fil: unknown key"),
        ("basic_auth_user:\n  a: b\n", "basic_auth_user: unknown key"),
        ("http_server_config:\n  http2: false\n", "http_server_config: not supported"),
        ("tls_server_config:\n  key_file: k\n", "tls_server_config.cert_file: required"),
        ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n", "does not exist"),
        ("basic_auth_users:\n  prometheus: plaintext\n", "basic_auth_users.prometheus: expected a bcrypt hash"),
        ("basic_auth_users: [a, b]\n", "basic_auth_users: expected a mapping"),
        ("- a\n- b\n", "(top level): expected a mapping"),
        ("tls_server_config: {cert_file: [\n", "invalid YAML"),
    ],
)
def test_web_config_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(WebConfigError) as err:
        load_web_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    assert "plaintext" not in str(err.value)  # a pasted password is never echoed


def test_web_config_tls_value_errors(tmp_path: Path, pki: dict[str, Path]) -> None:
    base = f"tls_server_config:\n  cert_file: {pki['server_crt']}\n  key_file: {pki['server_key']}\n"
    cases = {
        "  min_version: TLS14\n": "min_version: 'TLS14' is not one of",
        "  client_auth_type: RequireAndVerifyClientCert\n": "client_ca_file: required",
        "  client_auth_type: RequireAnyClientCert\n": "not supported",
        "  client_auth_type: Sometimes\n": "is not one of",
        "  min_version: TLS13\n  max_version: TLS12\n": "below min_version",
    }
    for extra, expected in cases.items():
        with pytest.raises(WebConfigError, match=expected):
            load_web_config(write(tmp_path, base + extra))
    # a key that does not belong to the certificate is caught at start-up, not at the first scrape
    mismatched = f"tls_server_config:\n  cert_file: {pki['server_crt']}\n  key_file: {pki['client_key']}\n"
    with pytest.raises(WebConfigError, match="cannot load certificate"):
        load_web_config(write(tmp_path, mismatched))
    with pytest.raises(WebConfigError, match="cannot read"):
        load_web_config(tmp_path / "missing.yml")
