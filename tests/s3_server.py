"""A real S3 server for the tests: moto's server mode on 127.0.0.1, reached by the real boto3 client over HTTP, and a
tiny proxy in front of it that breaks requests on purpose (drops the connection, answers 503 SlowDown, stalls).
Dummy credentials exist only in the test's environment."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from moto.server import ThreadedMotoServer

from fastimagenet.dataset_tools import object_store

BUCKET = "datasets"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def _moto_port():
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield port
    server.stop()


@pytest.fixture
def s3(_moto_port, monkeypatch):
    """An empty bucket `datasets` on the local server; AWS_ENDPOINT_URL points at it. Returns a boto3 client for
    the test's own checks."""
    endpoint = f"http://127.0.0.1:{_moto_port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(object_store, "_clients", {})  # a client for this endpoint
    client = boto3.client("s3")
    listing = client.list_objects_v2(Bucket=BUCKET) if BUCKET in [b["Name"] for b in
                                                                  client.list_buckets()["Buckets"]] else None
    if listing is None:
        client.create_bucket(Bucket=BUCKET)
    for item in (listing or {}).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    return client


class FaultProxy:
    """Forwards HTTP requests to the S3 server; each GET whose path contains `match` first takes the next planned
    fault: "drop" (the connection closes without an answer), "503" (SlowDown) or a number (seconds of stall)."""

    def __init__(self, target_port: int, match: str = ".tar"):
        self.target_port, self.match = target_port, match
        self.plan: list = []
        self.injected = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if self.command == "GET" and proxy.match in self.path and proxy.plan:
                    fault = proxy.plan.pop(0)
                    proxy.injected += 1
                    if fault == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if fault == "503":
                        reply = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
                        self.send_response(503)
                        self.send_header("Content-Length", str(len(reply)))
                        self.end_headers()
                        self.wfile.write(reply)
                        return
                    time.sleep(float(fault))
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.target_port}"
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(s3, _moto_port, monkeypatch):
    """A FaultProxy in front of the S3 server, and AWS_ENDPOINT_URL pointing at it."""
    proxy = FaultProxy(_moto_port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr(object_store, "_clients", {})
    yield proxy
    proxy.close()
