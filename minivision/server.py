"""The plumbing of the local demo pages (`python -m minisam.app`, `python -m miniflorence.app`).

Standard library only (`http.server.ThreadingHTTPServer` + `json`), plus PIL to decode uploads. The
model packages add their endpoints as plain functions `(Request) -> Response` with `App.route`; this
module does everything else, with the rules every endpoint shares:

- It binds 127.0.0.1 unless told otherwise (`--host`); port 0 picks a free port. The URL is printed.
- It serves only its own files: the static page files are listed once at start-up and looked up
  by exact URL, so no URL (`/../`, `%2e%2e`, absolute paths, symlinks added later) reaches any
  other file.
- Uploads are capped (`max_upload` bytes, from Content-Length, before anything is parsed; an
  oversized body is read away unparsed so the client can read the refusal), and a POST without a
  Content-Length is refused. The page checks the size itself before uploading.
- Every error is one line of JSON, `{"error": "..."}`, with a fitting HTTP status; an unexpected
  exception is logged on the server's stderr (with its traceback, for the developer) and the browser
  gets one line naming it, never the traceback. The server keeps running after any request.
- Requests run in threads (several tabs or clients at once); an endpoint that uses the model holds
  the app's `model_lock`, so one model call runs at a time.
"""

from __future__ import annotations

import io
import json
import mimetypes
import secrets
import sys
import threading
import traceback
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the page: index.html, app.js, app.css, demo photos
MAX_UPLOAD = 32 * 1024 * 1024  # bytes of one request body
MAX_PIXELS = 40_000_000  # pixels of one uploaded image (width x height)
DRAIN_LIMIT = 256 * 1024 * 1024  # an oversized body up to this is read and dropped (the client sees the 413)


class HttpError(Exception):
    """A request the server refuses: `status` and a one-line message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    path: str  # the URL path, decoded, without the query
    query: dict[str, str]
    body: bytes = b""

    def json(self) -> dict[str, Any]:
        """The body as a JSON object, or a 400 naming what is wrong with it."""
        try:
            value = json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, f"the request body is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise HttpError(400, f"the request body must be a JSON object, got {type(value).__name__}")
        return value


@dataclass
class Response:
    body: bytes
    content_type: str = "application/json"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value, separators=(",", ":")).encode(), "application/json", status)


def error_response(status: int, message: str) -> Response:
    """One line of JSON: {"error": message} (newlines folded, so it stays one line)."""
    return json_response({"error": " ".join(str(message).split())}, status)


def field_of(value: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """value[name], which must be of `kind`; a missing or mistyped field is a 400 that says `what` it should be."""
    if name not in value:
        raise HttpError(400, f'the request lacks "{name}" ({what})')
    got = value[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(got, kinds) or (isinstance(got, bool) and bool not in kinds):
        raise HttpError(400, f'"{name}" must be {what}, got {json.dumps(got)[:60]}')
    return got


def decode_upload(body: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded image file -> a decoded PIL image (first frame, EXIF orientation applied, mode as stored).

    Refused with one line: an empty body, bytes PIL cannot read as an image, damaged data, and an
    image over `max_pixels` (checked from the header, before the pixels are decoded).
    """
    if not body:
        raise HttpError(400, "the upload is empty: choose an image file (JPEG, PNG, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            image = Image.open(io.BytesIO(body))
            w, h = image.size
            if w * h > max_pixels:
                raise HttpError(413, f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; this server takes at "
                                     f"most {max_pixels / 1e6:.1f} (downscale it, or start the server with a "
                                     "larger --max-pixels)")
            image.load()
            return ImageOps.exif_transpose(image)
    except HttpError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise HttpError(415, "the upload is not an image PIL can read (JPEG, PNG, BMP, GIF, TIFF, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise HttpError(415, f"the image cannot be decoded (truncated or damaged?): {e}") from None


class Sessions:
    """What the server keeps per uploaded image, by a random id (one per upload: two tabs never share
    state); the oldest are forgotten past `keep`. An id the server does not know (it restarted, or
    forgot the image) is a 404 that asks to open the image again."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self.items: dict[str, Any] = {}  # insertion order = age
        self.lock = threading.Lock()

    def add(self, value: Any) -> str:
        image_id = secrets.token_hex(8)
        with self.lock:
            self.items[image_id] = value
            while len(self.items) > self.keep:
                del self.items[next(iter(self.items))]
        return image_id

    def get(self, image_id: Any) -> Any:
        with self.lock:
            value = self.items.get(image_id) if isinstance(image_id, str) else None
        if value is None:
            raise HttpError(404, "this image is not on the server any more (it restarted, or forgot older images): "
                                 "re-open the image")
        return value


Handler = Callable[[Request], Response]


class App:
    """Routes, the static files and the lock around the model.

    Args:
        info: what `GET /api/info` returns (the page asks which model family is loaded).
        max_upload: the largest request body, in bytes.
        static_dir: the page's files; `/` serves its index.html.
    """

    def __init__(self, info: dict[str, Any], max_upload: int = MAX_UPLOAD, static_dir: Path = STATIC_DIR) -> None:
        self.max_upload = max_upload
        self.model_lock = threading.Lock()
        # Every file the server may send, by exact URL, fixed now: nothing else is reachable.
        self.static = {f"/static/{p.relative_to(static_dir).as_posix()}": p.resolve()
                       for p in sorted(static_dir.rglob("*")) if p.is_file()}
        self.static["/"] = (static_dir / "index.html").resolve()
        photos = [url for url in self.static if url.startswith("/static/photos/") and url.endswith(".jpg")]
        info = {**info, "photos": photos, "max_upload": max_upload}  # the page's photo buttons, its size check
        self.routes: dict[tuple[str, str], Handler] = {("GET", "/api/info"): lambda request: json_response(info)}

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    def handle(self, request: Request) -> Response:
        """The response to a request; every failure becomes one line of JSON."""
        try:
            handler = self.routes.get((request.method, request.path))
            if handler is not None:
                return handler(request)
            if request.method == "GET" and request.path in self.static:
                file = self.static[request.path]
                kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                return Response(file.read_bytes(), kind, headers={"Cache-Control": "no-cache"})
            if any(path == request.path for _, path in self.routes):
                raise HttpError(405, f"{request.method} is not allowed on {request.path}")
            raise HttpError(404, f"no such page or endpoint: {request.path[:200]}")
        except HttpError as e:
            return error_response(e.status, e.message)
        except Exception as e:  # a bug or an unforeseen input: the developer gets the traceback, the page one line
            traceback.print_exc(file=sys.stderr)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return error_response(500, f"internal error ({type(e).__name__}: {first[:300]}); the server log has the "
                                       "details")


def drain(stream: io.BufferedIOBase, length: int) -> None:
    """Read and drop `length` bytes (1 MiB at a time), or until the client stops sending."""
    while length > 0:
        chunk = stream.read(min(2**20, length))
        if not chunk:
            return
        length -= len(chunk)


def make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        server_version = "minivision"
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self.dispatch("POST")

        def dispatch(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            length_text = self.headers.get("Content-Length")
            if method == "POST" and length_text is None:
                return self.send(error_response(411, "the request needs a Content-Length"), close=True)
            try:
                length = int(length_text or 0)
                if length < 0:
                    raise ValueError
            except ValueError:
                return self.send(error_response(400, f"bad Content-Length {length_text[:40]!r}"), close=True)
            if length > app.max_upload:
                message = (f"the upload is {length / 2**20:.1f} MiB; this server takes at most "
                           f"{app.max_upload / 2**20:.1f} MiB (--max-upload-mb)")
                if length <= DRAIN_LIMIT:  # read it away, so that the client gets to read the answer
                    drain(self.rfile, length)
                return self.send(error_response(413, message), close=True)  # never kept, never parsed
            body = self.rfile.read(length) if length else b""
            self.send(app.handle(Request(method, path, query, body)))

        def send(self, response: Response, close: bool = False) -> None:
            try:
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(response.body)))
                self.send_header("X-Content-Type-Options", "nosniff")
                for key, value in response.headers.items():
                    self.send_header(key, value)
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(response.body)
            except (BrokenPipeError, ConnectionResetError):  # the browser went away: nothing to tell it
                self.close_connection = True

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (a malformed request line, an unsupported method such as PUT,
            an over-long header) as one line of JSON too, instead of its HTML page."""
            self.send(error_response(code, message or HTTPStatus(code).phrase), close=True)

        def log_message(self, format: str, *args: Any) -> None:  # quieter than the default: errors only
            if args and str(args[1] if len(args) > 1 else "").startswith(("4", "5")):
                sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return RequestHandler


def make_server(app: App, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A threaded server for `app` (port 0: a free one; read it from `server.server_address`)."""
    server = ThreadingHTTPServer((host, port), make_handler(app))
    server.daemon_threads = True
    return server


def serve(app: App, host: str, port: int, what: str) -> None:
    """Serve until Ctrl-C, after printing the URL."""
    try:
        server = make_server(app, host, port)
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror or e}") from None
    url = f"http://{host}:{server.server_address[1]}/"
    print(f"{what}: open {url} in a browser (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


def add_server_arguments(parser: Any) -> None:
    """The options every app shares: where it listens and what it accepts."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port (0: pick a free one)")
    group.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD / 2**20, help="largest upload, MiB")
    group.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="largest image, width x height")
