#!/usr/bin/env python3
"""Calling the FTS API with fts-tokend, Python standard library only.

Four ways, each a function to copy:
  token_from_file()       read the token (and the key) from the headers file, per request
  TokenWatcher            keep a token current through the socket's long poll
  call_api()              on a 401, report the token as rejected and retry with the next one
  call_through_proxy()    call the API through the daemon's proxy, holding no secret at all

Run as a script it does each once against FTS_API (default the real API) and prints one line per
step; `make test-examples` runs it against the mock server and a real daemon.

Environment: FTS_API (https://global-api.fintechstudios.com), FTS_HEADERS_FILE
(/run/fts-tokend/headers), FTS_SOCKET (/run/fts-tokend/tokend.sock), FTS_PROXY_SOCKET
(/run/fts-tokend/api.sock), FTS_PATH (the API path to call; /api/whoami on the mock).
"""
import hashlib
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.parse

API = os.environ.get("FTS_API", "https://global-api.fintechstudios.com")
HEADERS_FILE = os.environ.get("FTS_HEADERS_FILE", "/run/fts-tokend/headers")
SOCKET = os.environ.get("FTS_SOCKET", "/run/fts-tokend/tokend.sock")
PROXY_SOCKET = os.environ.get("FTS_PROXY_SOCKET", "/run/fts-tokend/api.sock")
PATH = os.environ.get("FTS_PATH", "/api/whoami")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (the token socket or the proxy)."""

    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def fingerprint(token):
    """What the daemon calls a token in logs and on the socket: the first 8 hex of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


# 1. Files: read the headers file for every request. The daemon replaces it by an atomic rename,
#    so a read is always one whole token; reading it each time picks up every rotation.
def token_from_file():
    """The two headers the API wants, as the daemon last wrote them."""
    headers = {}
    with open(HEADERS_FILE) as handle:
        for line in handle:
            name, _, value = line.rstrip("\n").partition(": ")
            headers[name] = value
    return headers


def api_request(headers, path=PATH):
    """GET path on the API with headers; returns (status, body)."""
    url = urllib.parse.urlsplit(API)
    connection_type = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(url.netloc, timeout=60)
    try:
        connection.request("GET", url.path.rstrip("/") + path, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


# 2. The socket's long poll: GET /token?wait=300&after=FP answers as soon as a token other than FP
#    is current (or at the timeout with the same one). No polling, no missed rotation.
class TokenWatcher:
    """Holds the current token, updated by a background thread as soon as the daemon rotates it."""

    def __init__(self, socket_path=SOCKET):
        self.socket_path = socket_path
        self.lock = threading.Lock()
        self.token, self.fp = self._get("/token")
        self.changed = threading.Condition(self.lock)
        threading.Thread(target=self._follow, daemon=True).start()

    def _get(self, target, timeout=60):
        connection = UnixHTTPConnection(self.socket_path, timeout=timeout)
        try:
            connection.request("GET", target)
            answer = connection.getresponse()
            body = answer.read().decode()
            if answer.status != 200:
                raise RuntimeError(f"{target}: HTTP {answer.status} {body.strip()}")
            return body, answer.getheader("X-Token-Fingerprint")
        finally:
            connection.close()

    def _follow(self):
        while True:
            try:
                token, fp = self._get(f"/token?wait=300&after={self.fp}", timeout=320)
            except (OSError, RuntimeError):
                time.sleep(5)  # the daemon restarting, or no valid token for now
                continue
            with self.changed:
                self.token, self.fp = token, fp
                self.changed.notify_all()

    def wait_for_change(self, after, timeout):
        """Blocks until the token is not `after` (a fingerprint); returns the token, or None."""
        with self.changed:
            self.changed.wait_for(lambda: self.fp != after, timeout)
            return self.token if self.fp != after else None


# 3. A 401 before the token's expiry (password changed, session revoked): report the token to the
#    daemon, which logs in at once (one login for every consumer that reports it, at most one per
#    refresh.minForcedRefreshSeconds), then use the next token. Never log in yourself.
def report_rejected(token):
    """POST /token/invalidate; returns the fingerprint of the token to wait past (None: re-read now)."""
    fp = fingerprint(token)
    while True:
        connection = UnixHTTPConnection(SOCKET)
        try:
            connection.request("POST", "/token/invalidate", headers={"X-Token-Fingerprint": fp})
            answer = connection.getresponse()
            answer.read()
        finally:
            connection.close()
        if answer.status == 202:
            return fp  # a login is under way: wait for the token after this one
        if answer.status == 409:
            return None  # already replaced: read the current one
        if answer.status == 429:
            time.sleep(int(answer.getheader("Retry-After", "1")))
            continue
        raise RuntimeError(f"report refused: HTTP {answer.status}")


def next_token(after):
    """The token after the one with fingerprint `after` (the socket's long poll)."""
    connection = UnixHTTPConnection(SOCKET, timeout=70)
    try:
        connection.request("GET", f"/token?wait=60&after={after}")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def call_api(path=PATH):
    """GET path with the file's headers; on a 401, report and retry once with the next token."""
    headers = token_from_file()
    status, body = api_request(headers, path)
    if status != 401:
        return status, body
    token = headers["Authorization"].split(" ")[-1]
    after = report_rejected(token)
    if after is not None:
        next_token(after)  # the daemon has written it to the files as well
    return api_request(token_from_file(), path)


# 4. The proxy: send the request to api.sock as if it were the API. The daemon adds the key and
#    the token, and replays it once after a 401. The consumer holds no secret.
def call_through_proxy(path=PATH):
    connection = UnixHTTPConnection(PROXY_SOCKET)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def main(steps):
    for step in steps:
        if step == "files":
            status, _ = api_request(token_from_file())
            print(f"files: GET {PATH} with the headers file -> {status}")
        elif step == "longpoll":
            watcher = TokenWatcher()
            print(f"longpoll: token {watcher.fp}; waiting for the next rotation")
            token = watcher.wait_for_change(watcher.fp, timeout=60)
            print(f"longpoll: next token {fingerprint(token) if token else 'none within 60 s'}")
            if token is None:
                return 1
        elif step == "rejected":
            status, _ = call_api()
            print(f"rejected: GET {PATH}, reported on 401 and retried -> {status}")
        elif step == "proxy":
            status, body = call_through_proxy()
            print(f"proxy: GET {PATH} through api.sock with no credentials -> {status}")
        else:
            raise SystemExit(f"unknown step {step} (files, longpoll, rejected, proxy)")
        if step != "longpoll" and status != 200:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["files", "longpoll", "rejected", "proxy"]))
