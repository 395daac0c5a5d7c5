"""Settings: flags, their GPU_EXPORTER_* twins, precedence and the start-up errors a user sees."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exporter.config import ConfigError, Settings, load_settings, parse_listen
from harness.support import REPO_ROOT


def test_defaults_from_nothing() -> None:
    s = load_settings([], environ={})
    assert s.listen == ("0.0.0.0", 9835)
    assert s.interval == 5.0
    assert s.simulate is None
    assert s.host_label  # the hostname
    assert s.log_level == "info"


def test_env_twins_and_flag_precedence() -> None:
    env = {
        "GPU_EXPORTER_LISTEN": "127.0.0.1:9000",
        "GPU_EXPORTER_INTERVAL": "0.5",
        "GPU_EXPORTER_HOST_LABEL": "from-env",
        "GPU_EXPORTER_SIMULATE": "healthy-8gpu",
    }
    s = load_settings([], environ=env)
    assert (s.listen, s.interval, s.host_label, s.simulate) == (
        ("127.0.0.1", 9000),
        0.5,
        "from-env",
        "healthy-8gpu",
    )
    s = load_settings(["--host-label", "from-flag", "--interval", "2"], environ=env)
    assert s.host_label == "from-flag"
    assert s.interval == 2.0
    assert s.listen == ("127.0.0.1", 9000)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:9835", ("127.0.0.1", 9835)),
        (":9835", ("0.0.0.0", 9835)),
        ("[::1]:9835", ("::1", 9835)),
        ("[::]:1", ("::", 1)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_listen_forms(raw: str, expected: tuple[str, int]) -> None:
    assert parse_listen(raw) == expected


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen", "9835"], {}, "invalid --listen '9835': expected HOST:PORT"),
        (["--listen", "::1:9835"], {}, "brackets"),
        (["--listen", "[::1]9835"], {}, "[IPV6]:PORT"),
        (["--listen", "[nothost]:80"], {}, "not an IPv6 address"),
        (["--listen", "127.0.0.1:70000"], {}, "between 1 and 65535"),
        (["--listen", "127.0.0.1:http"], {}, "between 1 and 65535"),
        (["--interval", "0"], {}, "invalid --interval '0': must be a number of seconds greater than 0"),
        (["--interval", "-1"], {}, "greater than 0"),
        (["--interval", "nan"], {}, "greater than 0"),
        ([], {"GPU_EXPORTER_INTERVAL": "soon"}, "invalid GPU_EXPORTER_INTERVAL 'soon'"),
        (["--log-level", "loud"], {}, "expected one of debug, info, warning, error"),
        ([], {"GPU_EXPORTER_LISTN": "x", "GPU_EXPORTER_FOO": "y"}, "GPU_EXPORTER_FOO, GPU_EXPORTER_LISTN"),
    ],
)
def test_bad_values_name_the_setting(args: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(args, environ=env)
    assert message in str(err.value)


def test_hook_variables_are_not_unknown() -> None:
    """The training hook's own variables may share the environment; they are not typos."""
    s = load_settings([], environ={"GPU_EXPORTER_URL": "http://x", "GPU_EXPORTER_JOB": "j"})
    assert isinstance(s, Settings)


def test_summary_is_json_ready() -> None:
    s = load_settings(["--listen", "[::1]:9100"], environ={})
    summary = s.summary()
    assert summary["listen"] == "[::1]:9100"
    assert s.listen_url == "http://[::1]:9100"


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_EXPORTER_")}
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen", "nope"], {}, "invalid --listen 'nope'"),
        (["--interval", "0"], {}, "invalid --interval '0'"),
        ([], {"GPU_EXPORTER_INTERVALL": "1"}, "unknown environment variable(s): GPU_EXPORTER_INTERVALL"),
        (["--simulate", "no-such-scenario"], {}, "no-such-scenario"),
    ],
)
def test_process_exits_nonzero_with_message(args: list[str], env: dict[str, str], message: str) -> None:
    """What a user sees: exit status 2 and one line on stderr naming the bad setting."""
    result = _run_cli(args, env)
    assert result.returncode == 2, result.stderr
    assert "gpu-exporter: error:" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_is_rejected_by_argparse() -> None:
    result = _run_cli(["--intervall", "1"])
    assert result.returncode == 2
    assert "unrecognized arguments: --intervall" in result.stderr


def test_help_lists_env_twins() -> None:
    result = _run_cli(["--help"])
    assert result.returncode == 0
    for env in ("GPU_EXPORTER_LISTEN", "GPU_EXPORTER_INTERVAL", "GPU_EXPORTER_SIMULATE"):
        assert env in result.stdout
