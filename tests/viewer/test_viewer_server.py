"""The viewer server without a browser: files of a small stand-in OHIF build, the single-page
app's routes, refusals, and the read-only DICOMweb proxy in front of a real Orthanc."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import builders
import pytest
from orthanc import DICOMWEB_PLUGIN, free_port, running_orthanc, storescu

from mrrp_pacs.viewer import ViewerServer

INDEX = b"<!doctype html><title>OHIF stand-in</title>"
CONFIG = b"window.config = {name: 'mrrp-pacs'};\n"


@pytest.fixture
def build(tmp_path: Path) -> tuple[Path, Path]:
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_bytes(INDEX)
    (dist / "app-config.js").write_bytes(b"window.config = {name: 'the build default'};\n")
    (dist / "app.bundle.js").write_bytes(b"console.log('app');\n")
    (dist / "assets" / "codec.wasm").write_bytes(b"\0asm\1\0\0\0")
    (tmp_path / "secret.txt").write_bytes(b"outside the build")
    config = tmp_path / "app-config.js"
    config.write_bytes(CONFIG)
    return dist, config


def fetch(server: ViewerServer, path: str, method: str = "GET",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send ``path`` exactly as given (no client-side normalisation of ``..``)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_files_routes_and_refusals(build):
    dist, config = build
    with ViewerServer(dist, config, "http://127.0.0.1:9") as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.study_list_url == f"{server.url}/"
        assert server.study_url("1.2.3", "4.5") == (
            f"{server.url}/viewer?StudyInstanceUIDs=1.2.3%2C4.5")

        for route in ("/", "/viewer", "/viewer/dicomweb?StudyInstanceUIDs=1.2.3"):
            status, headers, body = fetch(server, route)
            assert (status, body) == (200, INDEX), route
            assert headers["Content-Type"] == "text/html; charset=utf-8"
        status, headers, body = fetch(server, "/app-config.js")
        assert (status, body, headers["Content-Type"]) == (200, CONFIG, "text/javascript")
        status, headers, _ = fetch(server, "/assets/codec.wasm")
        assert (status, headers["Content-Type"]) == (200, "application/wasm")
        status, headers, body = fetch(server, "/app.bundle.js", method="HEAD")
        assert (status, headers["Content-Length"], body) == (200, "20", b"")

        # a missing bundle is a 404, not HTML; nothing outside the build is served
        assert fetch(server, "/missing.bundle.js")[0] == 404
        assert fetch(server, "/../secret.txt")[0] == 400
        assert fetch(server, "/%2e%2e/secret.txt")[0] == 400
        assert fetch(server, "/" + "a" * 9000)[0] == 414
        status, headers, _ = fetch(server, "/dicom-web/studies", method="POST")
        assert (status, headers["Allow"]) == (405, "GET, HEAD")
        assert fetch(server, "/dicom-web/studies/1", method="DELETE")[0] == 405

        # nothing listens on port 9: the proxy says so instead of hanging or crashing
        assert fetch(server, "/dicom-web/studies")[0] == 502


def test_refuses_a_missing_build_or_a_non_http_orthanc(build, tmp_path):
    dist, config = build
    with pytest.raises(FileNotFoundError, match="npm ci --prefix deploy/viewer"):
        ViewerServer(tmp_path / "nowhere", config, "http://127.0.0.1:8042")
    with pytest.raises(ValueError, match="expected http://host"):
        ViewerServer(dist, config, "https://127.0.0.1:8042")


@pytest.mark.needs_tool("Orthanc", "libOrthancDicomWeb.so", "storescu")
def test_dicomweb_is_forwarded_with_host_status_and_type(build, tmp_path):
    dist, config = build
    image = builders.us_image(builders.Patient())
    builders.write(image, tmp_path / "incoming" / "us.dcm")
    with running_orthanc(tmp_path / "orthanc", plugins=[DICOMWEB_PLUGIN]) as orthanc:
        assert storescu(orthanc, tmp_path / "incoming").returncode == 0
        with ViewerServer(dist, config, f"http://127.0.0.1:{orthanc.http_port}",
                          port=free_port()) as server:
            status, headers, body = fetch(server, "/dicom-web/studies",
                                          headers={"Accept": "application/dicom+json"})
            assert status == 200
            assert headers["Content-Type"].startswith("application/dicom+json")
            (study,) = json.loads(body)
            assert study["0020000D"]["Value"] == [image.StudyInstanceUID]
            # Orthanc names its resources with the Host it was asked with: the viewer's own
            assert study["00081190"]["Value"] == [
                f"{server.url}/dicom-web/studies/{image.StudyInstanceUID}"]

            status, _, body = fetch(
                server, f"/dicom-web/studies/{image.StudyInstanceUID}/series/"
                f"{image.SeriesInstanceUID}/instances/{image.SOPInstanceUID}/frames/1",
                headers={"Accept": "multipart/related; type=application/octet-stream"})
            assert status == 200 and len(body) > image.Rows * image.Columns

            status, _, _ = fetch(server, "/dicom-web/studies/1.2.3.4/metadata")
            assert status == 404  # Orthanc's answer, passed on

            # Orthanc's own REST API answers these (checked: 200 before the proxy decoded
            # paths); through the viewer they are refused, whatever the encoding
            for attack in ("/patients", "/dicom-web/../patients", "/dicom-web/%2e%2e/system",
                           "/wado/../statistics", "/dicom-web/%2E%2e/patients",
                           "/dicom-web/studies/..%2f..%2fpatients",
                           "/dicom-web/%252e%252e/system"):
                status, _, body = fetch(server, attack)
                assert status == 400 or (status, body) == (200, INDEX), (attack, body)
            # OHIF's WADO-URI request still goes through
            status, headers, body = fetch(
                server, f"/wado?requestType=WADO&studyUID={image.StudyInstanceUID}"
                f"&seriesUID={image.SeriesInstanceUID}&objectUID={image.SOPInstanceUID}"
                "&contentType=application/dicom")
            assert status == 200 and body[128:132] == b"DICM", (status, body[:300])
