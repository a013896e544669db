#!/usr/bin/env python3
"""A minimal stand-in for Adobe IMS for the load benchmark (benches/load.sh).

Answers `POST .../ims/token/v3` with a fresh bearer token. A request whose
scopes include `swap` gets `expires_in: 2`, so the proxy replaces its token
about once a second (refresh at half the lifetime); any other gets a day.
GET /count answers how many tokens were issued. Loopback only.

Usage: ims_stub.py PORT
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

issued = 0
lock = threading.Lock()
# IMS access tokens are JWTs of about 1.1 kB; the proxy forwards the same size nginx does.
PAD = "x" * 1000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 (http.server naming)
        global issued
        length = int(self.headers.get("content-length") or 0)
        form = self.rfile.read(length).decode("utf-8", "replace")
        if "grant_type=client_credentials" not in form:
            self._send(400, {"error": "invalid_request", "error_description": "grant_type"})
            return
        with lock:
            issued += 1
            n = issued
        scopes = parse_qs(form).get("scope", [""])[0].split(",")
        expires = 2 if "swap" in scopes else 86400
        self._send(
            200,
            {"access_token": f"eyJbench.{n}.{PAD}", "token_type": "bearer", "expires_in": expires},
        )

    def do_GET(self):  # noqa: N802
        self._send(200, {"issued": issued})

    def log_message(self, *args):
        pass


def main():
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"ims stub on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
