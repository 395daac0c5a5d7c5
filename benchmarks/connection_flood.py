"""Connection floods against the real exporter: probe answers, open file descriptors and RSS.

Two floods, each against a fresh exporter (simulated 2-GPU node, file limit 1,024 as in a default
container): ``--idle`` plain TCP connections that never send a byte, and ``--tls`` connections to an
HTTPS exporter that never start the TLS handshake. While a flood is held open, /healthz is probed
``--probes`` times on new connections; then the flood is closed. Prints figures; asserts nothing.

    python -m benchmarks.connection_flood [--idle 600] [--tls 3000] [--probes 50]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness.process import Child, free_port, open_fds, rss_bytes
from harness.security import make_pki


def flood(port: int, count: int) -> list[socket.socket]:
    out: list[socket.socket] = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            out.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    return out


def run(name: str, port: int, proc: Child, count: int, probes: int, url: str, ctx: ssl.SSLContext | None) -> None:
    def probe() -> int:
        try:
            with urllib.request.urlopen(url, timeout=10, context=ctx) as resp:
                return int(resp.status)
        except OSError as exc:
            return int(getattr(exc, "code", 0) or 0)

    deadline = time.monotonic() + 30
    while probe() != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"exporter not answering:\n{proc.log()}")
        time.sleep(0.2)
    rss0, fds0 = rss_bytes(proc.pid), open_fds(proc.pid)
    sockets = flood(port, count)
    time.sleep(1.0)  # let the exporter take the flood in (a benchmark: nothing to wait on but time)
    started = time.perf_counter()
    codes = [probe() for _ in range(probes)]
    took = (time.perf_counter() - started) / probes
    rss1, fds1 = rss_bytes(proc.pid), open_fds(proc.pid)
    for s in sockets:
        s.close()
    ok = codes.count(200)
    print(f"{name}: {len(sockets)} connections held; /healthz 200 on {ok}/{probes} probes "
          f"({took * 1000:.0f} ms each on average); exporter fds {fds0} -> {fds1}, "
          f"RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB; alive: {proc.alive()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle", type=int, default=600, help="idle plain-TCP connections")
    p.add_argument("--tls", type=int, default=3000, help="connections that never start the TLS handshake")
    p.add_argument("--probes", type=int, default=50)
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.tls + args.idle + 256)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pki = make_pki(d)
        web = d / "web.yml"
        web.write_text(f"tls_server_config:\n  cert_file: {pki['server_crt']}\n  key_file: {pki['server_key']}\n")
        for name, count, extra, scheme in (
            ("idle TCP flood", args.idle, "", "http"),
            ("TLS flood (no ClientHello)", args.tls, f" --web-config-file {web}", "https"),
        ):
            port = free_port()
            cmd = f"ulimit -n 1024 && exec {sys.executable} -m exporter --listen 127.0.0.1:{port} --simulate tiny{extra}"
            proc = Child(name.split()[0], ["sh", "-c", cmd], d)
            ctx = ssl.create_default_context(cafile=str(pki["ca_crt"])) if scheme == "https" else None
            try:
                run(name, port, proc, count, args.probes, f"{scheme}://127.0.0.1:{port}/healthz", ctx)
            finally:
                proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
