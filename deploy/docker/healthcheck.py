#!/usr/bin/env python3
"""Container health check for wattmeter: GET /healthz on the local server.

Exit status 0 when /healthz answers 200, or 401 (basic auth is enabled by
--web-config and this check carries no credentials: the server is up and
answering). Anything else fails: 503 (no sensor works), connection refused,
timeout, TLS failure.

URL: $WATTMETER_HEALTHCHECK_URL (default http://127.0.0.1:9445/healthz). For
https:// the certificate is not verified: the check only talks to itself.
Standard library only; installed in the image as /usr/local/bin/wattmeter-healthcheck.
"""
import os
import ssl
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9445/healthz"


def check(url: str, timeout: float = 4.0) -> int:
    context = ssl._create_unverified_context()  # noqa: S323 - loopback self-check
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:
        print(f"wattmeter-healthcheck: {url}: {e}", file=sys.stderr)
        return 1
    if status in (200, 401):
        return 0
    print(f"wattmeter-healthcheck: {url}: HTTP {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(check(os.environ.get("WATTMETER_HEALTHCHECK_URL") or DEFAULT_URL))
