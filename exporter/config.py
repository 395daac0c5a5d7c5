"""Settings of the exporter: command-line flags, each with an environment twin, validated at start.

Every setting is one field of ``Settings``; the flag (``--host-label``), its environment variable
(``GPU_EXPORTER_HOST_LABEL``), help text and parser all come from that field, so adding a setting is a
one-field edit. Precedence: flag > environment > default. Any ``GPU_EXPORTER_*`` variable that names no
setting is an error (a typo must not be silently ignored), except the training hook's own variables.

This module imports only the standard library: it runs before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "GPU_EXPORTER_"
# A secret read from the environment but never a flag (a flag would show up in `ps`); see ingest.auth.
INGEST_TOKEN_ENV = "GPU_EXPORTER_INGEST_TOKEN"
LOG_LEVELS = ("debug", "info", "warning", "error")
# --docker and --kubelet: ask that source when its socket is there (auto), always (on), or never (off).
SOURCE_MODES = ("auto", "on", "off")
# The Docker engine's own default address, used when neither --docker-host nor DOCKER_HOST is set.
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


class ConfigError(ValueError):
    """A setting has a value the exporter cannot run with; the message says which and why."""


# ---------------------------------------------------------------------------------------------- parsers
# Each parser turns the raw string (from a flag or the environment) into the setting's value, or raises
# ValueError with a message that completes "invalid --flag VALUE: ...".


def parse_listen(raw: str) -> tuple[str, int]:
    """HOST:PORT, with IPv6 hosts in brackets ([::1]:9835); an empty host means all interfaces."""
    raw = raw.strip()
    if raw.startswith("["):
        host, sep, port_text = raw[1:].partition("]:")
        if not sep:
            raise ValueError("expected [IPV6]:PORT, e.g. [::1]:9835")
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{host!r} is not an IPv6 address") from exc
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep:
            raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:9835 or [::1]:9835")
        if ":" in host:
            raise ValueError("put an IPv6 host in brackets, e.g. [::1]:9835")
        host = host or "0.0.0.0"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not a number between 1 and 65535")
    return host, int(port_text)


def parse_positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds greater than 0") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a number of seconds greater than 0")
    return value


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_log_level(raw: str) -> str:
    level = raw.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return level


def parse_optional_str(raw: str) -> str | None:
    return raw.strip() or None


def parse_str(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def parse_positive_int(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("must be a whole number greater than 0") from None
    if value <= 0:
        raise ValueError("must be a whole number greater than 0")
    return value


def parse_rate(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of requests per second (0 turns the limit off)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of requests per second >= 0 (0 turns the limit off)")
    return value


def parse_proxies(raw: str) -> tuple[str, ...]:
    """Comma-separated IP addresses or networks (CIDR) of reverse proxies to trust; empty: none."""
    out: list[str] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
    return tuple(out)


def parse_source_mode(raw: str) -> str:
    mode = raw.strip().lower()
    if mode not in SOURCE_MODES:
        raise ValueError(f"expected {', '.join(SOURCE_MODES[:-1])} or {SOURCE_MODES[-1]}")
    return mode


def setting(
    default: Any,
    help: str,
    parse: Callable[[str], Any] = parse_str,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one setting: a dataclass field carrying its help text and parser.

    A boolean setting (``parse=parse_bool``) becomes ``--name`` / ``--no-name``.
    ``default_factory`` computes a default at parse time (e.g. the hostname).
    """
    meta = {"help": help, "parse": parse, "metavar": metavar, "default_factory": default_factory}
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The validated configuration. Add a setting by adding a field declared with ``setting()``."""

    listen: tuple[str, int] = setting(
        ("0.0.0.0", 9835), "address to serve HTTP on: HOST:PORT or [IPV6]:PORT", parse_listen, "HOST:PORT"
    )
    interval: float = setting(
        5.0, "seconds between NVML polls (scrapes never wait for a poll)", parse_positive_seconds, "SECONDS"
    )
    simulate: str | None = setting(
        None,
        "run on simulated GPUs: a shipped scenario name (e.g. healthy-8gpu) or a scenario file path",
        parse_optional_str,
        "SCENARIO",
    )
    host_label: str = setting(
        "", "value of the `host` label on every series (default: the hostname)", parse_str, "NAME",
        default_factory=socket.gethostname,
    )
    log_level: str = setting("info", f"logging level: {', '.join(LOG_LEVELS)}", parse_log_level, "LEVEL")
    docker: str = setting(
        "auto",
        "container names from the Docker engine: auto (when its socket exists), on, off "
        "(container ids come from the cgroup in every mode)",
        parse_source_mode,
        "auto|on|off",
    )
    docker_host: str | None = setting(
        None, f"Docker engine URL (default: DOCKER_HOST, else {DEFAULT_DOCKER_HOST})",
        parse_optional_str, "URL",
    )
    proc_root: str = setting(
        "/proc", "where the host's /proc is visible (e.g. /host/proc when mounted there)", parse_str, "PATH"
    )
    kubelet: str = setting(
        "auto",
        "Kubernetes pod/namespace/container of each allocated GPU from the kubelet's PodResources API: "
        "auto (when the socket's directory exists), on, off",
        parse_source_mode,
        "auto|on|off",
    )
    kubelet_socket: str = setting(
        "/var/lib/kubelet/pod-resources/kubelet.sock",
        "the kubelet's PodResources socket (non-default kubelet root dirs: <root>/pod-resources/kubelet.sock)",
        parse_str,
        "PATH",
    )
    training_ttl: float = setting(
        300.0,
        "seconds a training process that stopped pushing keeps its last values on /metrics",
        parse_positive_seconds,
        "SECONDS",
    )
    training_max_processes: int = setting(
        1024, "most training processes tracked at once (more are refused with 429)", parse_positive_int, "N"
    )
    training_max_jobs: int = setting(
        64, "most distinct training jobs tracked at once (a new job beyond it is refused with 429)",
        parse_positive_int, "N",
    )
    # The series budget (exporter.ingest.store): ~2.3 MB of /metrics at 128-character labels, rendered
    # in well under a second (benchmarks/series_budget.py), and with an 8-GPU node's own series still
    # under the fleet agents' per-node sample_limit of 5,000 (deploy/fleet/agent.yml).
    training_max_series: int = setting(
        3_000,
        "most series all training processes together may add to /metrics (a push past it gets 429 "
        "series_budget; what was accepted stays)",
        parse_positive_int, "N",
    )
    training_max_series_per_process: int | None = setting(
        None,
        "most series one training process may add to /metrics (default: the most one valid push can "
        "produce, 163)",
        parse_positive_int, "N",
    )
    max_connections: int = setting(
        512,
        "most open connections, TLS handshakes included; at the cap the longest-idle one is closed for a "
        "new one (503 only when all are serving requests)",
        parse_positive_int, "N",
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "reverse proxies (IPs or CIDR networks, comma-separated) whose X-Forwarded-For / X-Forwarded-Proto "
        "are believed; default none: the TCP peer is the client",
        parse_proxies, "ADDRS",
    )
    web_config_file: str | None = setting(
        None,
        "web-config file (Prometheus exporter-toolkit format): TLS (tls_server_config) and basic auth "
        "(basic_auth_users, bcrypt) for every endpoint but /healthz, /readyz and the ingest API",
        parse_optional_str,
        "PATH",
    )
    ingest_token_file: str | None = setting(
        None,
        "file holding the bearer token training hooks must send to POST /api/v1/training "
        "(or set GPU_EXPORTER_INGEST_TOKEN); without a token only loopback clients may push",
        parse_optional_str,
        "PATH",
    )
    ingest_rate_limit: float = setting(
        50.0, "training pushes per second allowed per client address, burst twice that (0 = no limit)",
        parse_rate, "PER_SECOND",
    )

    @property
    def listen_url(self) -> str:
        host, port = self.listen
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{port}"

    def summary(self) -> dict[str, Any]:
        """Settings as plain JSON values, for /status and the start-up log line."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "listen":
                host, port = value
                value = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            elif isinstance(value, tuple):
                value = list(value)
            # Secrets (tokens) must never be shown; settings holding them end in _file by convention.
            out[f.name] = value
        return out


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _settings_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Settings))


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-exporter",
        description="Prometheus exporter for NVIDIA GPUs and PyTorch training jobs. "
        f"Every flag can also be set by an environment variable: {ENV_PREFIX}<FLAG> "
        "(e.g. --host-label -> GPU_EXPORTER_HOST_LABEL); a flag wins over its variable.",
    )
    for f in _settings_fields():
        meta = f.metadata
        help_text = f"{meta['help']} [env {env_name(f.name)}]"
        if meta["parse"] is parse_bool:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {'on' if f.default else 'off'})",
            )
        else:
            shown = "computed" if meta["default_factory"] else _show_default(f.default)
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                metavar=meta["metavar"] or f.name.upper(),
                default=None,
                help=f"{help_text} (default: {shown})",
            )
    from exporter import __version__

    parser.add_argument("--version", action="version", version=f"gpu-exporter {__version__}")
    return parser


def _show_default(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}:{value[1]}"
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return "none" if value is None else str(value)


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse flags and environment into validated ``Settings``; raise ``ConfigError`` on any problem.

    argparse itself exits with status 2 on unknown flags or missing values (its own message).
    """
    environ = os.environ if environ is None else environ
    fields = _settings_fields()
    known_env = {env_name(f.name) for f in fields}
    from exporter.hook.env import (
        HOOK_ENV_NAMES,  # the training hook's own variables may share the environment
    )

    allowed = known_env | HOOK_ENV_NAMES | {INGEST_TOKEN_ENV}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in allowed)
    if unknown:
        raise ConfigError(
            f"unknown environment variable(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known_env))}"
        )
    args = build_arg_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields:
        meta = f.metadata
        raw = getattr(args, f.name)
        source = flag_name(f.name)
        if raw is None and env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], env_name(f.name)
        if raw is None:
            if meta["default_factory"] is not None:
                values[f.name] = meta["default_factory"]()
            continue
        if isinstance(raw, bool):  # BooleanOptionalAction already parsed it
            values[f.name] = raw
            continue
        try:
            values[f.name] = meta["parse"](raw)
        except ValueError as exc:
            raise ConfigError(f"invalid {source} {raw!r}: {exc}") from None
    return Settings(**values)


def log_level_number(level: str) -> int:
    return int(getattr(logging, level.upper()))
