"""Who may push: the ingest token (file wins over the environment, never echoed) and the loopback-only default."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.ingest.auth import IngestAuthenticator, IngestTokenError, is_loopback, load_ingest_token


def test_token_from_file_wins_and_is_stripped(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("file-token-0123456789\n")
    assert load_ingest_token(f, {"GPU_EXPORTER_INGEST_TOKEN": "env-token-0123456789"}) == "file-token-0123456789"
    assert load_ingest_token(None, {"GPU_EXPORTER_INGEST_TOKEN": " env-token-0123456789 "}) == "env-token-0123456789"
    assert load_ingest_token(None, {}) is None


def test_token_errors_never_show_the_token(tmp_path: Path) -> None:
    with pytest.raises(IngestTokenError, match="cannot read"):
        load_ingest_token(tmp_path / "missing", {})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(IngestTokenError, match="empty"):
        load_ingest_token(empty, {})
    spaced = tmp_path / "spaced"
    spaced.write_text("two words-secret-value")
    with pytest.raises(IngestTokenError) as err:
        load_ingest_token(spaced, {})
    assert "secret" not in str(err.value)
    assert "secret" not in repr(IngestAuthenticator("a-secret-token-123"))


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.4.5.6", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "testclient", "", None):
        assert not is_loopback(host), host


def test_authenticator_policy() -> None:
    open_ = IngestAuthenticator(None)
    assert open_.check("127.0.0.1", None) is None
    denial = open_.check("10.1.2.3", None)
    assert denial is not None and denial.status == 403 and "--ingest-token-file" in denial.message
    auth = IngestAuthenticator("right-token-0123456789")
    assert auth.check("10.1.2.3", "Bearer right-token-0123456789") is None
    assert auth.check("10.1.2.3", "bearer  right-token-0123456789 ") is None
    for header in (None, "", "Bearer", "Basic cmlnaHQ=", "Bearer wrong-token", "Bearer right-token-012345678"):
        d = auth.check("127.0.0.1", header)  # loopback too: a configured token is required of everyone
        assert d is not None and d.status == 401, header
        assert any(k == "WWW-Authenticate" for k, _ in d.headers)
        assert "right-token" not in d.message
