"""Runs inside a test namespace: forwards JSON lines to the daemon's API on 127.0.0.1.

Usage: ``ip netns exec NS python _agent.py DATA_DIR``; each stdin line is
``{"method", "path", "body", "timeout"}``, each stdout line ``{"status", "body"}`` (status 0
with the error text when the daemon did not answer). Stdlib only: it starts fast.
"""

from __future__ import annotations

import http.client
import json
import sys
import urllib.parse
from pathlib import Path


def main() -> None:
    """Serve requests until stdin closes."""
    data_dir = Path(sys.argv[1])
    for line in sys.stdin:
        request = json.loads(line)
        try:
            info = json.loads((data_dir / "api.json").read_text())
            token = (data_dir / "api-token").read_text().strip()
            url = urllib.parse.urlsplit(info["url"])
            conn = http.client.HTTPConnection(url.hostname, url.port,
                                              timeout=float(request.get("timeout", 45)))
            headers = {"Authorization": f"Bearer {token}"}
            payload = None
            if request.get("body") is not None:
                payload = json.dumps(request["body"]).encode()
                headers["Content-Type"] = "application/json"
            try:
                conn.request(request["method"], request["path"], body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            finally:
                conn.close()
            kind = response.getheader("content-type", "")
            body = json.loads(raw) if raw and kind.startswith("application/json") else None
            reply = {"status": response.status, "body": body}
        except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
            reply = {"status": 0, "body": repr(exc)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
