"""A stand-in for a vLLM API server process, for supervisor tests: it starts a child that
outlives it when it is killed (as vLLM's EngineCore does) and answers GET /health.

    python -m tests.stand_in_engine --port N --marker TEXT
"""

from __future__ import annotations

import argparse
import http.server
import subprocess
import sys


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--marker", required=True, help="text in both processes' command lines")
    args = parser.parse_args()
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", f"engine-core-of-{args.marker}"])
    http.server.ThreadingHTTPServer(("127.0.0.1", args.port), _Health).serve_forever()


if __name__ == "__main__":
    main()
