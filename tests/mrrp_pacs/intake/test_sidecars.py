import json

import numpy as np
import pytest
from builders import Patient, us_image, write, wsi_image

from mrrp_pacs.cases import case_inputs
from mrrp_pacs.errors import SidecarError
from mrrp_pacs.intake import Outcome
from mrrp_pacs.intake.sidecars import polygons, read_sidecar, voc_boxes

ASAP = b"""<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
 <Annotation Name="tumour" Type="Polygon"><Coordinates>
  <Coordinate Order="1" X="20" Y="10"/><Coordinate Order="0" X="10" Y="10"/>
  <Coordinate Order="2" X="20" Y="30"/>
 </Coordinates></Annotation>
</Annotations></ASAP_Annotations>"""
GEOJSON = json.dumps({"type": "FeatureCollection", "features": [{
    "type": "Feature", "properties": {"classification": {"name": "Tumor"}},
    "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [20, 10], [20, 30], [10, 10]]]},
}]}).encode()
VOC = b"""<annotation><folder>us</folder><filename>IMG0001</filename>
<size><width>80</width><height>64</height><depth>1</depth></size>
<object><name>lesion</name><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>30</xmax><ymax>20</ymax>
</bndbox></object></annotation>"""


def test_kinds_and_geometry():
    assert read_sidecar(ASAP).kind == "asap"
    assert read_sidecar(GEOJSON).kind == "geojson"
    assert read_sidecar(VOC).image_file_name == "IMG0001"
    assert polygons(ASAP)[0].tolist() == [[10, 10], [20, 10], [20, 30]]  # by Order
    assert polygons(GEOJSON)[0].tolist() == [[10, 10], [20, 10], [20, 30], [10, 10]]
    assert voc_boxes(VOC) == [(5.0, 6.0, 30.0, 20.0)]


@pytest.mark.parametrize(("data", "reason"), [
    (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><annotation>&a;</annotation>',
     "DOCTYPE or entity declaration"),
    (b"<annotation><object>", "not well-formed"),
    (b"<svg/>", "neither ASAP nor Pascal VOC"),
    (b'{"type": "Topology"}', "not GeoJSON"),
    (b"{broken", "not valid JSON"),
])
def test_hostile_or_foreign_files_are_refused(data, reason):
    with pytest.raises(SidecarError, match=reason):
        read_sidecar(data)


def test_sidecars_are_stored_and_linked_to_their_images(intake, store, config, tmp_path):
    tmp_path = tmp_path / "drop"
    patient = Patient("S1")
    slide, image = wsi_image(patient), us_image(patient)
    write(slide, tmp_path / "slide" / "level0.dcm")
    (tmp_path / "slide" / "region.xml").write_bytes(ASAP)  # linked by folder
    write(image, tmp_path / "us" / "IMG0001")
    (tmp_path / "us" / "boxes.xml").write_bytes(VOC)  # linked by <filename>
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / f"{slide.SeriesInstanceUID}.geojson").write_bytes(GEOJSON)  # by name
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            (result,) = intake.receive_path(path)
            assert result.outcome is Outcome.NEW, (path, result.reason)
    (case,) = case_inputs(store, config).values()
    assert sorted(s.kind for s in case.slide_sidecars) == ["asap", "geojson"]
    assert [s.image_uid for s in case.us_sidecars] == [image.SOPInstanceUID]
    assert case.modalities == ["wsi", "wsi_roi", "us_image", "us_roi"]
    again = intake.receive_path(tmp_path / "us" / "boxes.xml")
    assert again[0].outcome is Outcome.DUPLICATE
    asap = next(s for s in case.slide_sidecars if s.kind == "asap")
    assert np.array_equal(polygons(store.objects.read_bytes(asap.sha256))[0], polygons(ASAP)[0])
