"""Container HEALTHCHECK for the exporter image: is /healthz answering on this container's port?

Plain HTTP first; if that fails, HTTPS (the web-config file may turn TLS on) without verifying the
certificate: it is our own process on loopback, and liveness is all this asks. Standard library only.
Exit 0 when healthy, 1 otherwise (Docker's convention).
"""

import os
import ssl
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("GPU_EXPORTER_LISTEN", ":9835").rsplit(":", 1)[1]
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    errors = []
    for url, context in ((f"http://127.0.0.1:{port}/healthz", None), (f"https://127.0.0.1:{port}/healthz", unverified)):
        try:
            with urllib.request.urlopen(url, timeout=4, context=context) as response:
                if response.status == 200:
                    return 0
                errors.append(f"{url}: HTTP {response.status}")
        except Exception as exc:  # any failure means "not healthy", reported below
            errors.append(f"{url}: {exc}")
    print("unhealthy: " + "; ".join(errors), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
