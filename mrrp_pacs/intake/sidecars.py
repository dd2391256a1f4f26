"""Region sidecar files: ASAP XML and QuPath GeoJSON (slide regions), Pascal-VOC XML (boxes).

Files from a drop folder are hostile input: XML is parsed with defusedxml with DTDs forbidden,
sizes are capped, and only the elements needed are read. This module is the one place that
reads sidecar content; feature extraction asks it for polygons and boxes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from xml.etree.ElementTree import Element

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from mrrp_pacs.errors import SidecarError

MAX_SIDECAR_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Sidecar:
    kind: str  # asap | geojson | voc
    image_file_name: str | None  # VOC names the image it annotates


def looks_like_sidecar(head: bytes) -> bool:
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return stripped.startswith((b"<?xml", b"<ASAP_Annotations", b"<annotation", b"{", b"["))


def parse_xml(data: bytes | str) -> Element:
    """Parse hostile XML: DOCTYPE and entity declarations are refused (defusedxml)."""
    try:
        return fromstring(data, forbid_dtd=True)
    except DefusedXmlException:
        raise SidecarError("has a DOCTYPE or entity declaration (refused)") from None
    except ParseError as exc:
        raise SidecarError(f"is not well-formed XML: {exc}") from None


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SidecarError(f"is not valid JSON: {exc}") from None


def _features(document: Any) -> list[dict[str, Any]] | None:
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features", [])
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    elif isinstance(document, list) and document:
        features = document
    else:
        return None
    if not all(isinstance(f, dict) and f.get("type") == "Feature" for f in features):
        return None
    return features


def read_sidecar(data: bytes) -> Sidecar:
    """Classify ``data``.

    Raises
    ------
    SidecarError
        Too large, unsafe or malformed, or neither ASAP, Pascal VOC nor GeoJSON.
    """
    if len(data) > MAX_SIDECAR_BYTES:
        raise SidecarError(f"is {len(data)} bytes, more than {MAX_SIDECAR_BYTES} for a sidecar")
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        root = parse_xml(data)
        if root.tag == "ASAP_Annotations":
            return Sidecar("asap", None)
        if root.tag == "annotation" and root.find("object/bndbox") is not None:
            return Sidecar("voc", (root.findtext("filename") or "").strip() or None)
        raise SidecarError(f"is XML but neither ASAP nor Pascal VOC (root <{root.tag}>)")
    if _features(_json(data)) is None:
        raise SidecarError("is JSON but not GeoJSON")
    return Sidecar("geojson", None)


def polygons(data: bytes) -> list[np.ndarray]:
    """Polygons (n, 2) as (x = column, y = row) level-0 pixels of an ASAP or GeoJSON file."""
    kind = read_sidecar(data).kind
    found: list[np.ndarray] = []
    if kind == "asap":
        for annotation in parse_xml(data).iter("Annotation"):
            coordinates = sorted(annotation.iter("Coordinate"),
                                 key=lambda c: float(c.get("Order", "0")))
            try:
                found.append(np.array([(float(c.get("X", "")), float(c.get("Y", "")))
                                       for c in coordinates]))
            except ValueError:
                raise SidecarError("has an ASAP coordinate that is not a number") from None
    elif kind == "geojson":
        for feature in _features(_json(data)) or []:
            geometry = feature.get("geometry") or {}
            if geometry.get("type") == "Polygon":
                rings = geometry.get("coordinates", [])[:1]
            elif geometry.get("type") == "MultiPolygon":
                rings = [polygon[0] for polygon in geometry.get("coordinates", []) if polygon]
            else:
                continue
            for ring in rings:
                try:
                    found.append(np.asarray(ring, dtype=np.float64)[:, :2])
                except (ValueError, IndexError, TypeError):
                    raise SidecarError("has a GeoJSON ring that is not a list of points") from None
    else:
        raise SidecarError("is a Pascal VOC box file, not a region outline")
    return [p for p in found if len(p) >= 3 and np.isfinite(p).all()]


def voc_boxes(data: bytes) -> list[tuple[float, float, float, float]]:
    """Boxes (xmin, ymin, xmax, ymax) in pixels of a Pascal-VOC / LabelImg file."""
    if read_sidecar(data).kind != "voc":
        raise SidecarError("is not a Pascal VOC file")
    boxes = []
    for box in parse_xml(data).iter("bndbox"):
        try:
            values = tuple(float(box.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise SidecarError("has a bndbox value that is not a number") from None
        boxes.append((values[0], values[1], values[2], values[3]))
    return boxes
