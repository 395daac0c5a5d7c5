"""A tiny Alertmanager webhook receiver that prints each notification as it arrives (the demo's pager).

    python scripts/webhook_receiver.py --port 9099

One line per alert: time, receiver path (/page, /ticket, /watchdog), FIRING/RESOLVED, alert name,
its identifying labels and its description. Standard library only, so it runs before anything is
installed. Alertmanager's shipped configs post to http://127.0.0.1:9099/<receiver>.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHOWN_LABELS = ("severity", "host", "gpu", "xid", "training_job", "rank", "service", "instance")


def format_alert(path: str, alert: dict[str, Any]) -> str:
    """The one-line rendering of one alert of a notification."""
    labels = alert.get("labels") or {}
    shown = " ".join(f"{k}={labels[k]}" for k in SHOWN_LABELS if labels.get(k))
    desc = (alert.get("annotations") or {}).get("description", "")
    stamp = time.strftime("%H:%M:%S")
    return f"[{stamp}] {path} {str(alert.get('status', '?')).upper()} {labels.get('alertname', '?')} {shown} -- {desc}"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length))
            alerts = list(body.get("alerts") or [])
        except (ValueError, AttributeError):
            self.send_response(400)
            self.end_headers()
            return
        for alert in alerts:
            print(format_alert(self.path, alert), flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print Alertmanager webhook notifications.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9099)
    args = parser.parse_args(argv)
    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as exc:
        print(f"webhook_receiver: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(f"webhook receiver listening on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
