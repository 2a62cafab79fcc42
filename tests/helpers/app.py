"""Helpers of the web-page tests: a tiny seeded SAM / Florence-2 app served on 127.0.0.1 port 0 in a thread,
and plain urllib requests that return (status, JSON) and check that every error is one line of JSON."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from official import fill_sam_random

import minisam
from minivision.server import App, make_server


def tiny_sam(seed: int = 0) -> minisam.Sam:
    """minisam's tiny config with the seeded weights of tests/reference/official.py (masks with structure)."""
    model = minisam.Sam(minisam.tiny_config()).eval()
    with torch.no_grad():
        fill_sam_random(model, seed)
    return model


@contextmanager
def serving(app: App) -> Iterator[str]:
    """The app served on a free port of 127.0.0.1 in a background thread; yields its base URL."""
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def request(url: str, body: bytes | dict | None = None, method: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON) of a request; an error answer must be one line {"error": ...} without a traceback."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        check_error_line(text)
        return e.code, json.loads(text)


def raw_get(base: str, path: str) -> tuple[int, str]:
    """GET a path exactly as written (no client-side normalisation of `..` or `%2e`)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def check_error_line(text: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    value = json.loads(text)
    assert set(value) == {"error"} and value["error"].strip(), text
