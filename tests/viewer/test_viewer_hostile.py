"""The viewer proxy against what a stranger or a web page of another site may send: paths that
leave DICOMweb, foreign Host headers (DNS rebinding), bodies smuggled after a refusal, and
generated request targets (fuzz). A small recording HTTP server on 127.0.0.1 stands where
Orthanc is, so that the tests see exactly what would have reached the PACS."""

from __future__ import annotations

import http.client
import posixpath
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from mrrp_pacs.viewer import Refused, ViewerServer, host_allowed, route


class Upstream:
    """Records every request target it receives and answers 200 with a small JSON body."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                upstream.targets.append(self.path)
                body = b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def viewer(tmp_path: Path, upstream: Upstream) -> Iterator[ViewerServer]:
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_bytes(b"<!doctype html><title>stand-in</title>")
    config = tmp_path / "app-config.js"
    config.write_bytes(b"window.config = {};\n")
    with ViewerServer(dist, config, upstream.url, allowed_hosts=("viewer.hospital.example",)) \
            as server:
        yield server


def raw_exchange(port: int, request: bytes, timeout_s: float = 5) -> tuple[bytes, bool]:
    """Send ``request`` as bytes; return everything answered and whether the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        answer, closed = b"", False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            answer += chunk
        return answer, closed


def confined(target: str) -> bool:
    """Whether Orthanc, decoding the path once or twice and resolving dot segments, would
    serve it from DICOMweb or WADO-URI only."""
    path = target.partition("?")[0]
    once = urllib.parse.unquote(path)
    for form in (path, once, urllib.parse.unquote(once)):
        resolved = posixpath.normpath(form.replace("\\", "/"))
        if not (resolved == "/wado" or resolved.startswith("/dicom-web/")
                or (resolved == "/dicom-web" and form.endswith("/"))):
            return False
        if ".." in form.split("/"):
            return False
    return True


def test_paths_out_of_dicomweb_are_refused_before_reaching_orthanc(viewer, upstream):
    host = {"Host": f"127.0.0.1:{viewer.port}"}
    for attack in ("/dicom-web/../patients", "/dicom-web/%2e%2e/system", "/wado/../statistics",
                   "/dicom-web/./../tools", "/dicom-web//studies", "/dicom-web/a%2f..%2f..",
                   "/dicom-web/%252e%252e/system", "/dicom-web/studies%5c..%5c..%5csystem",
                   "/wado%2f..%2fstatistics"):
        connection = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=10)
        connection.request("GET", attack, headers=host)
        response = connection.getresponse()
        assert response.status == 400, attack
        response.read()
        connection.close()
    # not DICOMweb nor WADO-URI: the viewer's own files (an app route); http.server turns a
    # leading // into / before the proxy sees it
    for path in ("/wadofoo", "/dicom-web", "//127.0.0.1/patients"):
        connection = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=10)
        connection.request("GET", path, headers=host)
        assert connection.getresponse().status == 200
        connection.close()
    assert upstream.targets == []

    connection = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=10)
    connection.request("GET", "/dicom-web/studies/1.2.3/series?limit=1%2C2", headers=host)
    assert connection.getresponse().status == 200
    connection.close()
    assert upstream.targets == ["/dicom-web/studies/1.2.3/series?limit=1%2C2"]


def test_a_foreign_host_is_refused_so_a_rebound_page_reads_nothing(viewer, upstream):
    port = viewer.port
    for host, status in ((f"attacker.example:{port}", 421), (f"127.0.0.1:{port + 1}", 421),
                         ("127.0.0.1", 421), (f"localhost:{port}", 200),
                         (f"[::1]:{port}", 200), (f"VIEWER.hospital.example:{port}", 200)):
        answer, _ = raw_exchange(port, f"GET /dicom-web/studies HTTP/1.1\r\nHost: {host}\r\n"
                                       "Connection: close\r\n\r\n".encode())
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (host, answer[:80])
    answer, _ = raw_exchange(port, b"GET /dicom-web/studies HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 421 "), "no Host at all"
    # HTTP/0.9 (no version: found by the fuzz test, a newline in the target) has no status
    # line and, in http.server, still reads the lines after it as headers: refused
    answer, closed = raw_exchange(port, f"GET /dicom-web/studies\n HTTP/1.1\r\nHost: "
                                        f"127.0.0.1:{port}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 ") and closed, answer
    # a request line refused before its version is read (found by make soak): still a status
    # line, never an HTML page alone
    for line in (b"GET /dicom-web/\r/\n", b"GET /dicom-web/ HTTP/x\r\n", b"GET / a b c\r\n",
                 b"GET /dicom-web/ HTTP/2.0\r\n"):
        answer, closed = raw_exchange(port, line + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 505"), answer
        assert closed
    two = (f"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
           f"Host: attacker.example:{port}\r\n\r\n")
    assert raw_exchange(port, two.encode())[0].startswith(b"HTTP/1.1 421 ")
    assert len(upstream.targets) == 3  # the three allowed names only

    assert host_allowed(f"viewer.hospital.example:{port}", viewer.allowed_hosts, port)
    assert not host_allowed(None, viewer.allowed_hosts, port)
    assert not host_allowed(f"127.0.0.1:{port}x", viewer.allowed_hosts, port)


def test_a_refused_body_is_never_read_as_the_next_request(viewer, upstream):
    port = viewer.port
    smuggled = (f"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode()
    for method in ("POST", "PUT", "GET"):
        request = (f"{method} /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f"Content-Length: {len(smuggled)}\r\n\r\n").encode() + smuggled
        answer, closed = raw_exchange(port, request)
        assert closed, method
        assert answer.count(b"HTTP/1.1 ") == 1, (method, answer)
    # a GET with a body is answered (the body ignored) and nothing else is forwarded
    assert upstream.targets == ["/dicom-web/studies"]
    # a chunked body too large to drain: answered, closed, not parsed
    request = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode() + b"5\r\nhello\r\n0\r\n\r\n" \
        + smuggled
    answer, closed = raw_exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 405 ") and answer.count(b"HTTP/1.1 ") == 1 and closed
    assert upstream.targets == ["/dicom-web/studies"]


SEGMENTS = st.sampled_from(["dicom-web", "wado", "studies", "series", "..", ".", "", "%2e",
                            "%2E%2e", "%2f", "%5c", "%25", "%252e%252e", "patients", "system",
                            "1.2.3", "%00", "%c0%ae", "a%2f..", "\\..", "..;", "%ff", "tools"])


@st.composite
def targets(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(SEGMENTS, st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="/?#"), max_size=6)),
        max_size=6))
    first = draw(st.sampled_from(["/dicom-web/", "/wado", "/", "/wado/", "//", ""]))
    query = draw(st.sampled_from(["", "?a=1", "?x=%2e%2e/", "?#"]))
    return first + "/".join(parts) + query


@pytest.mark.fuzz
@fuzz_settings(ci_examples=1000)
@given(targets())
def test_fuzz_route_never_leaves_dicomweb(target):
    try:
        decided = route(target)
    except Refused as refusal:
        assert refusal.status in (400, 414)
        return
    assert decided.target.isascii() and " " not in decided.target
    if decided.proxied:
        assert confined(decided.target), (target, decided)


@pytest.mark.fuzz
@fuzz_settings(ci_examples=300, soak_examples=20_000)
@given(target=targets(), host=st.sampled_from(["ok", "foreign", "port", "none"]),
       body=st.binary(max_size=64))
def test_fuzz_the_running_proxy_answers_in_time_and_forwards_only_dicomweb(
        viewer, upstream, target, host, body):
    port = viewer.port
    hosts = {"ok": f"127.0.0.1:{port}", "foreign": f"attacker.example:{port}",
             "port": "127.0.0.1:1", "none": None}
    head = f"GET {target or '/'} HTTP/1.1\r\n"
    if hosts[host] is not None:
        head += f"Host: {hosts[host]}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    head += "Connection: close\r\n\r\n"
    before = len(upstream.targets)
    started = time.monotonic()
    answer, _ = raw_exchange(port, head.encode("utf-8", "surrogateescape") + body, timeout_s=2)
    assert time.monotonic() - started < 1.0
    assert answer.startswith(b"HTTP/1.") and b" 500 " not in answer[:16], answer[:60]
    for forwarded in upstream.targets[before:]:
        assert host == "ok" and confined(forwarded), (target, forwarded)
