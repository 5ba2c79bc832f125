"""Tiny HTTP servers on 127.0.0.1 that answer like each cloud's instance metadata service.

Each follows its provider's documented protocol for the preemption notice:
  aws    IMDSv2: PUT /latest/api/token with X-aws-ec2-metadata-token-ttl-seconds (400 without) gives
         a token; GET /latest/meta-data/spot/instance-action needs it (401 without, or once it
         expired); 404 until a notice, then {"action": "terminate", "time": "...Z"}.
  gcp    GET /computeMetadata/v1/... needs `Metadata-Flavor: Google` (403 without); answers with
         that header; instance/preempted is FALSE, then TRUE.
  azure  GET /metadata/... needs `Metadata: true` (400 without); scheduledevents lists no events,
         then a Preempt event for this VM with NotBefore (RFC 1123).

Served from a thread of the test process (`with MetadataServer("aws") as s: ...; s.notify()`);
recipe processes started by the test reach it at `s.url`.
"""

from __future__ import annotations

import email.utils
import json
import secrets
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

VM_NAME = "train-vm-0"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out and left
            super().handle_error(request, client_address)


class MetadataServer:
    def __init__(self, cloud: str, lead_seconds: float = 120.0, token_ttl_cap: Optional[float] = None):
        assert cloud in ("aws", "gcp", "azure")
        self.cloud, self.lead_seconds, self.token_ttl_cap = cloud, lead_seconds, token_ttl_cap
        self.noticed_at: Optional[float] = None
        self.delay = 0.0          # seconds every answer waits (a slow service)
        self.drip = 0.0           # seconds between the bytes of a body (a service that drips)
        self.huge_body = 0        # bytes of a body with no Content-Length (a service gone wrong)
        self.other_vm = False     # azure: the Preempt event names another VM
        self.tokens: dict[str, float] = {}  # aws: token -> expiry
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.sent: list[dict[str, str]] = []  # each request's headers, in the order of `requests`
        self.issued: list[str] = []  # aws: every token handed out
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, body: bytes = b"", headers: Optional[dict] = None) -> None:
                server.requests.append((self.command, self.path, status))
                server.sent.append(dict(self.headers.items()))
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if server.huge_body:  # a body of that many bytes, streamed, with no Content-Length
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = b"x" * (1 << 20)
                    for _ in range(server.huge_body >> 20):
                        self.wfile.write(chunk)
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drip:  # one byte every `drip` seconds
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(server.drip)
                    return
                self.wfile.write(body)

            def do_PUT(self):
                time.sleep(server.delay)
                getattr(server, f"_{server.cloud}")(self, "PUT")

            def do_GET(self):
                time.sleep(server.delay)
                getattr(server, f"_{server.cloud}")(self, "GET")

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: Optional[threading.Thread] = None

    # -- control ----------------------------------------------------------------------------
    def notify(self) -> None:
        self.noticed_at = time.time()

    @property
    def deadline(self) -> Optional[float]:
        return None if self.noticed_at is None else self.noticed_at + self.lead_seconds

    def expire_tokens(self) -> None:
        self.tokens = {t: 0.0 for t in self.tokens}

    def start(self) -> "MetadataServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- providers --------------------------------------------------------------------------
    def _aws(self, h, method: str) -> None:
        if h.path == "/latest/api/token":
            if method != "PUT":
                return h._answer(405)
            ttl = h.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            if not ttl or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return h._answer(400, b"missing or invalid X-aws-ec2-metadata-token-ttl-seconds")
            token = secrets.token_urlsafe(16)
            self.issued.append(token)
            self.tokens[token] = time.time() + min(int(ttl), self.token_ttl_cap or int(ttl))
            return h._answer(200, token.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
        if not h.path.startswith("/latest/meta-data/"):
            return h._answer(404)
        token = h.headers.get("X-aws-ec2-metadata-token")
        if method != "GET" or not token or self.tokens.get(token, 0.0) < time.time():
            return h._answer(401)
        if h.path == "/latest/meta-data/spot/instance-action":
            if self.noticed_at is None:
                return h._answer(404, b"Not Found")
            when = datetime.fromtimestamp(self.deadline, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return h._answer(200, json.dumps({"action": "terminate", "time": when}).encode(),
                             {"Content-Type": "application/json"})
        if h.path == "/latest/meta-data/instance-id":
            return h._answer(200, b"i-0123456789abcdef0")
        return h._answer(404)

    def _gcp(self, h, method: str) -> None:
        if not h.path.startswith("/computeMetadata/v1/"):
            return h._answer(404)
        if h.headers.get("Metadata-Flavor") != "Google":
            return h._answer(403, b"Missing Metadata-Flavor:Google header.")
        head = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
        if h.path == "/computeMetadata/v1/":
            return h._answer(200, b"instance/\nproject/\n", head)
        if h.path == "/computeMetadata/v1/instance/preempted":
            return h._answer(200, b"TRUE" if self.noticed_at is not None else b"FALSE", head)
        return h._answer(404, b"", head)

    def _azure(self, h, method: str) -> None:
        if not h.path.startswith("/metadata/"):
            return h._answer(404)
        if h.headers.get("Metadata") != "true":
            return h._answer(400, json.dumps({"error": "Bad request. Required metadata header not specified"}).encode())
        if "api-version=" not in h.path:
            return h._answer(400, json.dumps({"error": "Bad request. api-version was not specified"}).encode())
        path = h.path.split("?")[0]
        if path == "/metadata/instance":
            return h._answer(200, json.dumps({"compute": {"name": VM_NAME}}).encode())
        if path == "/metadata/instance/compute/name":
            return h._answer(200, VM_NAME.encode())
        if path == "/metadata/scheduledevents":
            events = []
            if self.noticed_at is not None:
                events.append({"EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
                               "ResourceType": "VirtualMachine",
                               "Resources": ["another-vm" if self.other_vm else VM_NAME],
                               "EventStatus": "Scheduled",
                               "NotBefore": email.utils.formatdate(self.deadline, usegmt=True),
                               "Description": "", "EventSource": "Platform", "DurationInSeconds": -1})
            return h._answer(200, json.dumps({"DocumentIncarnation": 1 + len(events), "Events": events}).encode())
        return h._answer(404)

