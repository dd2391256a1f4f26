"""OHIF v3 over Orthanc's DICOMweb, served from one origin: the results as a radiologist sees them.

:class:`ViewerServer` is a small threaded HTTP server that

- serves the prebuilt OHIF dist (npm package ``@ohif/app``, installed by
  ``npm ci --prefix deploy/viewer``) with our ``app-config.js`` in place of its own, and falls
  back to ``index.html`` for the single-page app's routes (``/``, ``/viewer``, …);
- forwards ``GET``/``HEAD`` of ``/dicom-web/…`` and ``/wado…`` to Orthanc, keeping the
  ``Host`` header, status codes and content types, and streaming bodies.

One origin, because OHIF then needs no CORS and Orthanc writes its bulk-data URIs with the
viewer's own host (its DICOMweb plugin builds them from ``Host``). The proxy is read-only
(no STOW, no DELETE): the viewer shows results, it does not change the PACS. It binds
127.0.0.1 unless told otherwise.

What a browser page on another site or a stranger on the network may send is refused before
anything reaches Orthanc (:func:`route`):

- a request target is confined to the DICOMweb prefixes *after* decoding: a dot segment
  (``..``, ``%2e%2e``), an empty segment, an encoded ``/`` or a backslash, a ``%`` left after
  decoding (double encoding) or a control character is a 400, so ``/dicom-web/../patients``
  never becomes Orthanc's REST API; what is forwarded is the normalised path, re-encoded;
- the ``Host`` header must name this viewer (loopback names, the address it binds, and
  ``allowed_hosts``) with its port, else 421: a page of another site whose name was made to
  resolve to 127.0.0.1 (DNS rebinding) cannot read the PACS through a user's browser;
- a request that carries a body (every refused POST, a GET with a body) is answered and its
  connection closed, so the body is never read as the next request.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import mimetypes
import posixpath
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
VIEWER_DIR = Path(__file__).resolve().parents[1] / "deploy" / "viewer"
"""``deploy/viewer`` of a source checkout: package.json, app-config.js, node_modules."""
INSTALL_COMMAND = "npm ci --prefix deploy/viewer --no-audit --no-fund --ignore-scripts"
DICOMWEB_PREFIX = "/dicom-web/"
WADO_URI_PATH = "/wado"
"""Forwarded to Orthanc: paths under :data:`DICOMWEB_PREFIX` and exactly :data:`WADO_URI_PATH`
(WADO-URI takes its arguments in the query); everything else is the viewer's own files."""
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})

_CHUNK_BYTES = 256 * 1024
_MAX_TARGET_CHARS = 8192  # a request line longer than this is not OHIF's
_UPSTREAM_TIMEOUT_S = 120.0
_CLIENT_TIMEOUT_S = 120.0
_DRAINED_BODY_BYTES = 64 * 1024  # a refused request's body up to this is read, then closed
_SEGMENT_SAFE = "-._~!$&'()*+,;=:@"  # RFC 3986 pchar besides unreserved, kept as they are
# RFC 9110 7.6.1: connection-specific fields are never forwarded
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
_CONTENT_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
                  ".json": "application/json", ".css": "text/css", ".svg": "image/svg+xml",
                  ".html": "text/html; charset=utf-8", ".woff2": "font/woff2"}


class Refused(ValueError):
    """A request the viewer does not serve: its HTTP status and a line for the client."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class Route:
    """Where a request target goes: Orthanc (``proxied``) or the viewer's files.

    ``path`` is normalised (decoded, checked, re-encoded); ``query`` is passed on as sent.
    """

    path: str
    query: str
    proxied: bool

    @property
    def target(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")


def route(target: str) -> Route:
    """The normalised route of an origin-form request target, or :class:`Refused` (400/414).

    Each ``/``-separated segment is percent-decoded once and must then be a plain name: not
    empty (except a trailing ``/``), not ``.`` or ``..``, without ``/``, a backslash, ``%`` (a
    second encoding) or control characters. Whether the target is proxied is decided on the
    normalised path, which is what Orthanc receives; the query must hold no control
    characters or spaces and no ``#``.
    """
    if len(target) > _MAX_TARGET_CHARS:
        raise Refused(414, "request target too long")
    if not target.startswith("/") or target.startswith("//"):
        raise Refused(400, "the request target must be a path")
    if "#" in target or any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in target):
        raise Refused(400, "control characters, spaces or '#' in the request target")
    raw_path, _, query = target.partition("?")
    raw_segments = raw_path.split("/")[1:]
    segments = []
    for index, raw in enumerate(raw_segments):
        try:
            name = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise Refused(400, "a path segment is not UTF-8") from None
        if name == "" and index == len(raw_segments) - 1:
            segments.append("")  # a trailing slash
            continue
        if name in ("", ".", "..") or any(ch in name for ch in "/\\%") \
                or any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in name):
            raise Refused(400, "the path holds an empty or dot segment or an encoded "
                               "separator")
        segments.append(name)
    path = "/" + "/".join(urllib.parse.quote(name, safe=_SEGMENT_SAFE) for name in segments)
    proxied = path == WADO_URI_PATH or path.startswith(DICOMWEB_PREFIX)
    return Route(path, query, proxied)


def host_allowed(host_header: str | None, allowed: frozenset[str], port: int) -> bool:
    """Whether a ``Host`` header names this server: an allowed name, and its own port."""
    if not host_header:
        return False
    value = host_header.strip().lower()
    if value.endswith("]") or ":" not in value:  # no port (an IPv6 literal is bracketed)
        name, given_port = value, ""
    else:
        name, _, given_port = value.rpartition(":")
    if given_port and (not given_port.isdigit() or int(given_port) != port):
        return False
    if not given_port and port != 80:
        return False
    return name in allowed


@dataclass(frozen=True)
class ViewerFiles:
    """Where the OHIF build and our configuration of it are."""

    dist_dir: Path
    app_config: Path


def viewer_files(viewer_dir: Path = VIEWER_DIR) -> ViewerFiles:
    """The OHIF dist and ``app-config.js`` under ``viewer_dir`` (``deploy/viewer``).

    Raises
    ------
    FileNotFoundError
        OHIF is not installed there, with the command that installs it.
    """
    files = ViewerFiles(viewer_dir / "node_modules" / "@ohif" / "app" / "dist",
                        viewer_dir / "app-config.js")
    _check_files(files.dist_dir, files.app_config)
    return files


def _check_files(dist_dir: Path, app_config: Path) -> None:
    if not (dist_dir / "index.html").is_file():
        raise FileNotFoundError(f"no OHIF build at {dist_dir} (index.html missing): install it "
                                f"with `{INSTALL_COMMAND}` from the repository root")
    if not app_config.is_file():
        raise FileNotFoundError(f"OHIF configuration {app_config} does not exist")


class ViewerServer:
    """OHIF and an Orthanc DICOMweb proxy on one loopback port; runs in its own threads.

    Parameters
    ----------
    dist_dir
        The OHIF build (``node_modules/@ohif/app/dist``): ``index.html`` and its bundles.
    app_config
        Served as ``/app-config.js`` instead of the build's own.
    orthanc_url
        Orthanc's HTTP root, e.g. ``http://127.0.0.1:8042``; its DICOMweb plugin must answer
        under ``/dicom-web/`` (the plugin's default root).
    host, port
        Where to listen; port 0 picks a free one (read it back from :attr:`port`).
    allowed_hosts
        Names besides the loopback ones and ``host`` that browsers may use for this server
        (the ``Host`` header; e.g. the machine's DNS name when ``host`` is ``0.0.0.0``).

    Raises
    ------
    FileNotFoundError
        The build or the configuration is missing.
    ValueError
        ``orthanc_url`` is not an ``http://host[:port]`` URL.
    """

    def __init__(self, dist_dir: Path, app_config: Path, orthanc_url: str,
                 host: str = LOOPBACK, port: int = 0,
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        _check_files(dist_dir, app_config)
        upstream = urllib.parse.urlsplit(orthanc_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"--orthanc {orthanc_url!r}: expected http://host[:port] of "
                             "Orthanc's HTTP server")
        self.dist_dir = dist_dir.resolve()
        self.app_config = app_config.resolve()
        self.upstream_host = upstream.hostname
        self.upstream_port = upstream.port or 80
        self.upstream_base = upstream.path.rstrip("/")
        if host != LOOPBACK:
            LOGGER.warning("viewer listens on %s, not only on this machine: anyone who reaches "
                           "it reads the PACS through it", host)
        wildcard = ("", "0.0.0.0", "::")  # noqa: S104 (names no host, so allows none)
        bound = {host.lower()} if host not in wildcard else set()
        self.allowed_hosts = frozenset(LOOPBACK_NAMES | bound
                                       | {name.strip().lower() for name in allowed_hosts})
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        """The viewer's origin, e.g. ``http://127.0.0.1:3000``."""
        host = str(self.server.server_address[0])
        return f"http://{host}:{self.port}"

    @property
    def study_list_url(self) -> str:
        """OHIF's study list (the studies Orthanc holds)."""
        return f"{self.url}/"

    def study_url(self, *study_instance_uids: str) -> str:
        """OHIF's basic viewer with the given studies loaded side by side in its study browser."""
        query = urllib.parse.urlencode({"StudyInstanceUIDs": ",".join(study_instance_uids)})
        return f"{self.url}/viewer?{query}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="viewer",
                                        daemon=True)
        self._thread.start()
        LOGGER.info("OHIF viewer on port %d, DICOMweb from Orthanc port %d", self.port,
                    self.upstream_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ViewerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def static_file(self, url_path: str) -> Path | None:
        """The file ``url_path`` names, the SPA's ``index.html`` for a route, else None.

        Only files under the dist folder are served: ``..`` and links out of it are not.
        """
        clean = posixpath.normpath("/" + urllib.parse.unquote(url_path)).lstrip("/")
        if clean == "app-config.js":
            return self.app_config
        candidate = (self.dist_dir / clean).resolve() if clean not in ("", ".") else None
        if candidate is not None and candidate.is_relative_to(self.dist_dir) \
                and candidate.is_file():
            return candidate
        # a route of the app (/viewer, /segmentation, …) has no dot in its last segment; a
        # missing bundle or image does, and gets a 404 instead of HTML it cannot parse
        if "." not in clean.rsplit("/", 1)[-1]:
            return self.dist_dir / "index.html"
        return None


def _handler(viewer: ViewerServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mrrp-pacs-viewer"
        sys_version = ""  # the Server header does not advertise the Python version
        timeout = _CLIENT_TIMEOUT_S
        # http.server answers a request line it refuses before reading its version (a bad
        # version, too many words: "GET /dicom-web/\r/\n" found by make soak) in HTTP/0.9
        # form, without a status line, unless the default version is 1.0 or later
        default_request_version = "HTTP/1.0"

        def parse_request(self) -> bool:
            if not super().parse_request():
                return False
            if len(self.requestline.split()) < 3:
                # "GET /path" with no version (HTTP/0.9): http.server has already read the
                # lines after it as headers. Refused with a status line, closed.
                self.close_connection = True
                self.send_error(400, "HTTP/0.9 is not served")
                return False
            return True

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def _refuse(self) -> None:
            self._drain()
            self._plain(405, "the viewer is read-only: only GET and HEAD are served",
                        {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

        def _drain(self) -> None:
            """A request with a body: read a small one, and close the connection after the
            answer either way, so that no body is ever read as the next request."""
            length = self.headers.get("Content-Length")
            if length is None and "Transfer-Encoding" not in self.headers:
                return
            self.close_connection = True
            if length is not None and length.strip().isdigit() \
                    and int(length) <= _DRAINED_BODY_BYTES:
                with contextlib.suppress(OSError, TimeoutError):
                    self.rfile.read(int(length))

        def _answer(self, head: bool) -> None:
            self._drain()
            try:
                if not host_allowed(self.headers.get("Host"), viewer.allowed_hosts,
                                    viewer.port) or len(self.headers.get_all("Host") or []) != 1:
                    raise Refused(421, "this viewer does not answer to that Host: open it by "
                                       "the name it was started with (see --allowed-host)")
                target = route(self.path)
            except Refused as refusal:
                LOGGER.info("viewer refused a %s from %s: %d", self.command,
                            self.client_address[0], refusal.status)
                self.close_connection = True
                self._plain(refusal.status, refusal.text)
                return
            try:
                if target.proxied:
                    self._proxy(target, head)
                else:
                    self._static(target.path, head)
            except (ConnectionError, TimeoutError):
                # the browser went away (a cancelled prefetch, a closed tab): nothing to answer
                self.close_connection = True

        def _static(self, path: str, head: bool) -> None:
            file = viewer.static_file(path)
            if file is None:
                self._plain(404, "not found")
                return
            size = file.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", _content_type(file))
            self.send_header("Content-Length", str(size))
            # index.html and app-config.js must follow a new install; bundles are hashed
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if not head:
                with file.open("rb") as source:
                    while chunk := source.read(_CHUNK_BYTES):
                        self.wfile.write(chunk)

        def _proxy(self, target: Route, head: bool) -> None:
            headers = {name: value for name, value in self.headers.items()
                       if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length"}
            upstream = http.client.HTTPConnection(viewer.upstream_host, viewer.upstream_port,
                                                  timeout=_UPSTREAM_TIMEOUT_S)
            try:
                try:
                    upstream.request(self.command, viewer.upstream_base + target.target,
                                     headers=headers)
                    response = upstream.getresponse()
                except (OSError, http.client.HTTPException) as error:
                    LOGGER.warning("Orthanc on port %d did not answer: %s",
                                   viewer.upstream_port, type(error).__name__)
                    self._plain(502, "Orthanc did not answer")
                    return
                self._relay(response, head)
            finally:
                upstream.close()

        def _relay(self, response: http.client.HTTPResponse, head: bool) -> None:
            self.send_response(response.status, response.reason)
            length = response.getheader("Content-Length")
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            if length is None and not head:
                # Orthanc always sends a length; a body of unknown length ends with the
                # connection (RFC 9112 6.3)
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if head:
                return
            while chunk := response.read1(_CHUNK_BYTES):
                self.wfile.write(chunk)
            if response.status >= 400:
                LOGGER.info("Orthanc answered %d to a %s", response.status, self.command)

        def _plain(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # request lines carry study and instance UIDs: they stay out of the log
            LOGGER.debug("viewer request from %s", self.client_address[0])

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            LOGGER.debug("viewer %s answered %s", self.command, code)

    return Handler


def _content_type(file: Path) -> str:
    return _CONTENT_TYPES.get(file.suffix.lower()) or mimetypes.guess_type(file.name)[0] \
        or "application/octet-stream"
