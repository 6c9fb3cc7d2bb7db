"""``ferkit serve``: a small web service over a Predictor — an upload page and a JSON endpoint (SPEC 6).

Standard library only (``http.server.ThreadingHTTPServer``); loopback by default. Routes:

* ``GET /`` the page (``static/index.html``, ``app.js``, ``style.css``): upload a photo, see faces and expression
  bars.
* ``GET /api/info`` model, classes, detector and limits.
* ``POST /api/predict`` a raw image body (``Content-Type: image/...`` or ``application/octet-stream``) or
  ``multipart/form-data`` with a file field ``image``. Answers ``{"width", "height", "faces": [{"box", "score",
  "label", "probs", "landmarks"}], "message"}``.

Input checks, each a JSON ``{"error": ...}``: no ``Content-Length`` 411; body over ``max_bytes`` or picture over
``max_pixels`` 413 (the body is not read); a declared type that is not an image or form 415; content whose magic bytes
are not JPEG / PNG / GIF / BMP / WebP / TIFF 415 (the file name and declared type are not trusted); an image that
does not decode 400.
"""
from __future__ import annotations

import email.parser
import email.policy
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from PIL import Image

from ferkit.data.base import DataError, ImageTooLarge, open_image

from .predictor import Predictor

__all__ = ["ServeConfig", "RequestError", "PredictService", "make_server", "sniff_image_type", "run_server"]

_log = logging.getLogger(__name__)

# magic bytes -> format (checked on the content itself; https://en.wikipedia.org/wiki/List_of_file_signatures)
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "jpeg"), (0, b"\x89PNG\r\n\x1a\n", "png"), (0, b"GIF87a", "gif"), (0, b"GIF89a", "gif"),
    (0, b"BM", "bmp"), (0, b"II*\x00", "tiff"), (0, b"MM\x00*", "tiff"),
)
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript"),
           "/static/style.css": ("style.css", "text/css")}
_CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; object-src 'none'"


@dataclass
class ServeConfig:
    max_bytes: int = 10 * 1024 * 1024  # upload size limit
    max_pixels: int = 40_000_000  # decoded picture limit (decompression bombs)


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def sniff_image_type(data: bytes) -> str | None:
    """Image format from the first bytes, or None when they are no supported image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for offset, magic, fmt in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return fmt
    return None


def _describe_content(data: bytes) -> str:
    head = data[:64].lstrip()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[:1] in (b"<", b"{", b"["):
        return "text (HTML / XML / JSON)"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "plain text"
    return "an unknown binary format"


class PredictService:
    """What the HTTP handler calls: request body -> JSON-ready answer. Inference is serialised by one lock (the face
    detectors are not re-entrant, and one model on a small machine gains nothing from concurrent calls)."""

    def __init__(self, predictor: Predictor, config: ServeConfig | None = None):
        self.predictor = predictor
        self.config = config or ServeConfig()
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        det = self.predictor.detector
        return {"model": self.predictor.meta.get("model"), "class_names": self.predictor.class_names,
                "input_size": self.predictor.input_size, "faces": self.predictor.faces,
                "detector": getattr(det, "name", None), "max_bytes": self.config.max_bytes,
                "max_pixels": self.config.max_pixels, "accepted": sorted(_PIL_FORMATS),
                "dataset": self.predictor.meta.get("dataset"), "warning": self.predictor.domain_warning}

    def extract_upload(self, body: bytes, content_type: str) -> bytes:
        """The image bytes of a raw or multipart request (415 for any other declared type)."""
        ctype = content_type.split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return _multipart_file(body, content_type)
        if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
            return body
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {ctype!r} is not accepted: send an image body (image/*) or "
                           "multipart/form-data with a file field 'image'")

    def decode(self, data: bytes) -> Image.Image:
        if not data:
            raise RequestError(HTTPStatus.BAD_REQUEST, "empty upload: no image bytes received")
        fmt = sniff_image_type(data)
        if fmt is None:
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                               f"the upload is {_describe_content(data)}, not an image; accepted: "
                               + ", ".join(f.upper() for f in sorted(_PIL_FORMATS)))
        # the shared decoder, as for files; no downscaling: the page draws the boxes on the picture as sent
        try:
            return open_image(io.BytesIO(data), "upload", max_side=None, max_pixels=self.config.max_pixels,
                              formats=[_PIL_FORMATS[fmt]])
        except ImageTooLarge as e:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e)) from None
        except DataError as e:  # truncated / corrupt data behind valid magic bytes
            raise RequestError(HTTPStatus.BAD_REQUEST, f"corrupt {fmt.upper()} image ({str(e)[:300]})") from None

    def predict(self, image: Image.Image) -> dict[str, Any]:
        start = time.perf_counter()
        with self._lock:
            rows = self.predictor.predict([image])[0]
        faces = [{"box": list(r.box), "score": r.score, "label": r.label, "source": r.source,
                  "probs": {k: round(v, 5) for k, v in (r.probs or {}).items()},
                  "landmarks": None if r.landmarks is None else r.landmarks.round(1).tolist()}
                 for r in rows if r.status == "ok"]
        out: dict[str, Any] = {"width": image.width, "height": image.height, "faces": faces,
                               "class_names": self.predictor.class_names,
                               "elapsed_ms": round(1000 * (time.perf_counter() - start), 1)}
        if not faces:
            out["message"] = "no face found in the picture"
        if self.predictor.domain_warning:
            out["warning"] = self.predictor.domain_warning
        return out


def _multipart_file(body: bytes, content_type: str) -> bytes:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise RequestError(HTTPStatus.BAD_REQUEST, "malformed multipart/form-data body")
    parts = list(msg.iter_parts())
    named = [p for p in parts if p.get_param("name", header="content-disposition") == "image"]
    files = named or [p for p in parts if p.get_filename() is not None]
    if not files:
        raise RequestError(HTTPStatus.BAD_REQUEST, "multipart/form-data without a file field 'image'")
    return files[0].get_payload(decode=True) or b""


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    server_version = "ferkit"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        _log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("Cache-Control", "no-store")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: dict[str, Any], close: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", close)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = self.path.split("?")[0]
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.server.service.info())
        if path in _STATIC:
            name, ctype = _STATIC[path]
            return self._send(HTTPStatus.OK, resources.files(__package__).joinpath("static", name).read_bytes(),
                              ctype)
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] != "/api/predict":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.path}"}, close=True)
        service = self.server.service
        try:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            if int(length) > service.config.max_bytes:  # refuse before reading a byte of the body
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"upload of {int(length) / 2**20:.1f} MiB is over the limit of "
                                   f"{service.config.max_bytes / 2**20:.1f} MiB")
            body = self.rfile.read(int(length))
            data = service.extract_upload(body, self.headers.get("Content-Type", ""))
            self._json(HTTPStatus.OK, service.predict(service.decode(data)))
        except RequestError as e:
            # the connection is closed after an error: an unread body must not be taken for the next request
            self._json(e.status, {"error": e.message, "status": int(e.status)}, close=True)
        except Exception as e:  # a bug must answer 500 with a reason, never hang the client
            _log.exception("predict failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {e.__class__.__name__}"},
                       close=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: PredictService


def make_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000,
                config: ServeConfig | None = None) -> _Server:
    """A bound, not yet serving server (``port=0`` picks a free port: ``server.server_address[1]``)."""
    server = _Server((host, port), _Handler)
    server.service = PredictService(predictor, config)
    return server


def run_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000,
               config: ServeConfig | None = None) -> None:
    """Serve until Ctrl-C."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        _log.warning("serving on %s: reachable from other machines; there is no authentication", host)
    server = make_server(predictor, host, port, config)
    _log.info("ferkit serve: http://%s:%d/  (Ctrl-C to stop)", host, server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
