"""The image's HEALTHCHECK: exit 0 when Lightwire's /healthz answers 200, else 1 (standard library only).

/healthz is liveness (the process serves HTTP; it needs no key); whether the model is loaded is /readyz's
business. The address comes from the same LIGHTWIRE_HOST / LIGHTWIRE_PORT the server reads.
"""

import os
import sys
import urllib.request

TIMEOUT_S = 4.0
ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}


def main() -> int:
    host = os.environ.get("LIGHTWIRE_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ANY_ADDRESS else host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{host}:{os.environ.get('LIGHTWIRE_PORT', '8400')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
