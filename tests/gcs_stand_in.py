"""A Cloud Storage stand-in speaking the JSON API (the part TensorStore's ``gcs`` driver
uses: object listing, metadata, media reads, uploads and deletes with generation
preconditions), serving a local directory as buckets and counting every request by kind.

``TENSORSTORE_GCS_HTTP_URL`` points TensorStore at it. Listing follows the real API:
pages of at most 1,000 names, ``startOffset``/``endOffset``/``prefix`` and page tokens;
a request for one object's metadata is a ``stat``, the thing a listing must not make
per image.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAGE = 1000


class GcsStandIn:
    def __init__(self, root: str):
        self.root = root
        self.requests: collections.Counter = collections.Counter()
        self.generations: dict[tuple[str, str], int] = {}  # an object's generation: its writes, counted
        self._lock = threading.Lock()  # a precondition and its write happen as one
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                stand_in._get(self)

            def do_POST(self):  # noqa: N802
                stand_in._upload(self)

            def do_DELETE(self):  # noqa: N802
                stand_in._delete(self)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """What a process needs to talk to this stand-in through TensorStore."""
        return {"TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "stand-in"}

    def close(self) -> None:
        self._server.shutdown()

    def _names(self, bucket: str) -> list[str]:
        base = os.path.join(self.root, bucket)
        found = []
        for d, _, files in os.walk(base):
            found += [os.path.relpath(os.path.join(d, f), base) for f in files]
        return sorted(found)

    def _generation(self, bucket: str, name: str) -> int:
        """0 for no object (what ``ifGenerationMatch=0`` asks), else the object's write count."""
        if not os.path.isfile(os.path.join(self.root, bucket, name)):
            return 0
        return self.generations.setdefault((bucket, name), 1)

    def _meta(self, bucket: str, name: str) -> bytes:
        path = os.path.join(self.root, bucket, name)
        return json.dumps({"name": name, "bucket": bucket, "size": str(os.path.getsize(path)),
                           "generation": str(self._generation(bucket, name)), "metageneration": "1"}).encode()

    def _reply(self, handler, code: int, body: bytes, kind: str = "application/json", headers=()) -> None:
        handler.send_response(code)
        for k, v in headers:
            handler.send_header(k, v)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _get(self, handler) -> None:
        url = urllib.parse.urlparse(handler.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = url.path.split("/")  # ['', 'storage', 'v1', 'b', BUCKET, 'o', NAME...]
        if len(parts) < 6 or parts[1:4] != ["storage", "v1", "b"] or parts[5] != "o":
            self.requests["other"] += 1
            return self._reply(handler, 404, b"{}")
        bucket = parts[4]
        if len(parts) == 6:  # a listing
            self.requests["list"] += 1
            names = self._names(bucket)
            lo, hi, prefix = query.get("startOffset", ""), query.get("endOffset"), query.get("prefix", "")
            names = [n for n in names if n >= lo and (hi is None or n < hi) and n.startswith(prefix)]
            start = int(query.get("pageToken", 0))
            size = min(int(query.get("maxResults", PAGE)), PAGE)
            page = names[start:start + size]
            body = {"kind": "storage#objects",
                    "items": [{"name": n, "bucket": bucket, "size": str(os.path.getsize(
                        os.path.join(self.root, bucket, n)))} for n in page]}
            if start + size < len(names):
                body["nextPageToken"] = str(start + size)
            return self._reply(handler, 200, json.dumps(body).encode())
        name = urllib.parse.unquote("/".join(parts[6:]))
        path = os.path.join(self.root, bucket, name)
        if not os.path.isfile(path):
            self.requests["stat" if query.get("alt") != "media" else "read"] += 1
            return self._reply(handler, 404, b'{"error": {"code": 404}}')
        if query.get("alt") == "media":
            self.requests["read"] += 1
            with open(path, "rb") as f:
                return self._reply(handler, 200, f.read(), "application/octet-stream",
                                   [("x-goog-generation", str(self._generation(bucket, name)))])
        self.requests["stat"] += 1
        return self._reply(handler, 200, self._meta(bucket, name))

    def _precondition_fails(self, bucket: str, name: str, query: dict) -> bool:
        want = query.get("ifGenerationMatch")
        return want is not None and int(want) != self._generation(bucket, name)

    def _upload(self, handler) -> None:
        url = urllib.parse.urlparse(handler.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = url.path.split("/")  # ['', 'upload', 'storage', 'v1', 'b', BUCKET, 'o']
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        bucket, name = parts[5], query["name"]
        with self._lock:
            self.requests["write"] += 1
            if self._precondition_fails(bucket, name, query):
                return self._reply(handler, 412, b'{"error": {"code": 412, "message": "precondition failed"}}')
            path = os.path.join(self.root, bucket, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(body)
            self.generations[(bucket, name)] = self._generation(bucket, name) + 1
            return self._reply(handler, 200, self._meta(bucket, name))

    def _delete(self, handler) -> None:
        url = urllib.parse.urlparse(handler.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = url.path.split("/")
        bucket, name = parts[4], urllib.parse.unquote("/".join(parts[6:]))
        with self._lock:
            self.requests["delete"] += 1
            if self._precondition_fails(bucket, name, query):
                return self._reply(handler, 412, b'{"error": {"code": 412, "message": "precondition failed"}}')
            path = os.path.join(self.root, bucket, name)
            if not os.path.isfile(path):
                return self._reply(handler, 404, b'{"error": {"code": 404}}')
            os.remove(path)
            self.generations.pop((bucket, name), None)
            return self._reply(handler, 204, b"")
