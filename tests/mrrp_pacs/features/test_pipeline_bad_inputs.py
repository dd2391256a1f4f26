"""Unusable inputs: a clear reason naming the instance, and nothing half-written."""

import highdicom as hd
import numpy as np
import pytest
from builders import (
    Patient,
    encode,
    mass_segmentation,
    pathology_result,
    us_image,
    us_report,
    us_roi_sr,
    wsi_image,
)
from pydicom.uid import generate_uid

from model_store import ModelStore
from mrrp_pacs.features import pipeline
from mrrp_pacs.features.us_encoder import save_us_encoder, train_us_encoder


@pytest.fixture
def encoder_store(config):
    config = config.replace("paths", model_store=config.paths.db_file.parent / "models")
    crops = np.random.default_rng(0).uniform(0, 255, (8, 256, 256)).astype(np.float32)
    model, history = train_us_encoder(crops, epochs=1)
    save_us_encoder(ModelStore(config.paths.model_store_dir), model, history, {"test": True})
    return config


def _families(store, key):
    return {r[0] for r in store.conn.execute(
        "SELECT family FROM features WHERE patient_key = ?", (key,))}


def test_each_bad_input_is_named_and_leaves_nothing(intake, store, encoder_store, tmp_path):
    config = encoder_store
    # B1: ultrasound without a calibrated region -> computed, flagged
    b1 = Patient("B1")
    image = us_image(b1)
    del image.SequenceOfUltrasoundRegions
    intake.receive_dicom(encode(image), "t")
    intake.receive_dicom(encode(us_roi_sr(b1, image, (10, 10, 50, 40))), "t")
    # B2: a VOC box of zero width next to its image -> us and radiomics fail
    b2 = Patient("B2")
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "IMG_B2").write_bytes(encode(us_image(b2)))
    (drop / "box.xml").write_bytes(b"<annotation><filename>IMG_B2</filename><object>"
                                   b"<bndbox><xmin>20</xmin><ymin>5</ymin><xmax>20</xmax>"
                                   b"<ymax>30</ymax></bndbox></object></annotation>")
    for path in sorted(drop.iterdir()):
        intake.receive_path(path)
    # B3: a report without a findings section -> text fails
    b3 = Patient("B3")
    image3 = us_image(b3)
    intake.receive_dicom(encode(image3), "t")
    intake.receive_dicom(encode(us_roi_sr(b3, image3, (10, 10, 50, 40))), "t")
    intake.receive_hl7(us_report(b3, text=("Normal examination.",)), "t")
    # B5: an image with no ROI and no lesion to find -> us and radiomics fail, image named
    b5 = Patient("B5")
    image5 = us_image(b5)
    intake.receive_dicom(encode(image5), "t")
    # B4: a "slide" that is one 32-px frame -> wsi and nuclei fail
    b4 = Patient("B4")
    slide = wsi_image(b4)
    intake.receive_dicom(encode(slide), "t")
    for patient in (b1, b2, b3, b4, b5):
        intake.receive_hl7(pathology_result(patient, f"PA-{patient.patient_id}"), "t")

    summary = pipeline.extract(store, config)
    failed = {(o.patient_key.split("^")[0], o.family): o.reason for o in summary.failures}
    assert set(failed) == {("B2", "us"), ("B2", "radiomics"), ("B3", "text"), ("B4", "wsi"),
                           ("B4", "nuclei"), ("B5", "us"), ("B5", "radiomics")}
    assert image5.SOPInstanceUID in failed["B5", "us"] and "no lesion ROI" in failed["B5", "us"]
    assert "VOC" in failed["B2", "us"] and "degenerate" in failed["B2", "us"]
    assert "report row" in failed["B3", "text"] and "no findings section" in failed["B3", "text"]
    assert slide.SeriesInstanceUID in failed["B4", "wsi"]
    assert _families(store, "B1^^^HOSP") == {"us", "radiomics", "clinical"}
    assert _families(store, "B2^^^HOSP") == {"clinical"}
    assert _families(store, "B3^^^HOSP") == {"us", "radiomics", "clinical"}
    assert _families(store, "B4^^^HOSP") == {"clinical"}
    assert _families(store, "B5^^^HOSP") == {"clinical"}
    flags = pipeline.FeatureCache(store).summary()["B1^^^HOSP"]["flags"]
    assert "fallback_spacing" in flags


def test_a_voc_box_is_used_but_flagged_as_a_box(intake, store, encoder_store, tmp_path):
    """A Pascal-VOC box has no outline: the features are computed on the box, flagged as such
    in the flags, the ``roi_is_outline`` array and the meta; an SR polygon is an outline."""
    config = encoder_store
    boxed = Patient("V1")
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "IMG_V1").write_bytes(encode(us_image(boxed)))
    (drop / "box.xml").write_bytes(b"<annotation><filename>IMG_V1</filename><object>"
                                   b"<bndbox><xmin>11</xmin><ymin>6</ymin><xmax>51</xmax>"
                                   b"<ymax>41</ymax></bndbox></object></annotation>")
    for path in sorted(drop.iterdir()):
        intake.receive_path(path)
    drawn = Patient("V2")
    image = us_image(drawn)
    intake.receive_dicom(encode(image), "t")
    intake.receive_dicom(encode(us_roi_sr(drawn, image, (10, 10, 50, 40))), "t")
    for patient in (boxed, drawn):
        intake.receive_hl7(pathology_result(patient, f"PA-{patient.patient_id}"), "t")

    summary = pipeline.extract(store, config)
    assert summary.failures == []
    cache = pipeline.FeatureCache(store)
    for key, source, shape in (("V1^^^HOSP", "voc", "box"), ("V2^^^HOSP", "sr", "outline")):
        for family in ("us", "radiomics"):
            features = cache.current(key, family)
            assert features is not None
            assert (features.meta["roi_source"], features.meta["roi_shape"]) == (source, shape)
            assert features.arrays["roi_is_outline"].tolist() == [shape == "outline"]
            assert ("box_roi" in features.flags) == (shape == "box")
    box = cache.current("V1^^^HOSP", "us")
    assert box is not None and box.arrays["box_px"].tolist() == [10, 5, 50, 40]  # VOC 1-based


def test_a_presentation_state_or_a_segmentation_draws_the_lesion(intake, store, encoder_store):
    """GSPS graphics and SEG segments are linked to their image at intake and read as masks."""
    config = encoder_store
    triangle = np.array([[10.0, 8.0], [70.0, 8.0], [40.0, 56.0], [10.0, 8.0]])
    by_gsps = Patient("G1")
    image = us_image(by_gsps)
    layer = hd.pr.GraphicLayer(layer_name="LESION", order=1)
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image], series_instance_uid=generate_uid(), series_number=3,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        content_label="LESION", graphic_layers=[layer], graphic_annotations=[
            hd.pr.GraphicAnnotation(referenced_images=[image], graphic_layer=layer,
                                    graphic_objects=[hd.pr.GraphicObject(
                                        hd.pr.GraphicTypeValues.POLYLINE, triangle,
                                        units="PIXEL")])])
    intake.receive_dicom(encode(image), "t")
    intake.receive_dicom(encode(state), "t")
    by_seg = Patient("S1")
    image2 = us_image(by_seg)
    rows, columns = np.mgrid[:64, :80]
    disc = ((rows - 32) ** 2 + (columns - 40) ** 2 <= 20**2).astype(np.uint8)
    seg = mass_segmentation(image2, disc[None])
    intake.receive_dicom(encode(image2), "t")
    intake.receive_dicom(encode(seg), "t")
    for patient in (by_gsps, by_seg):
        intake.receive_hl7(pathology_result(patient, f"PA-{patient.patient_id}"), "t")

    summary = pipeline.extract(store, config)
    assert summary.failures == []
    cache = pipeline.FeatureCache(store)
    for key, source, pixels in (("G1^^^HOSP", "gsps", 0.5 * 60 * 48),
                                ("S1^^^HOSP", "seg", float(disc.sum()))):
        radiomics = cache.current(key, "radiomics")
        assert radiomics is not None
        assert (radiomics.meta["roi_source"], radiomics.meta["roi_shape"]) == (source,
                                                                                "outline")
        assert abs(radiomics.meta["lesion_pixels"] - pixels) < 0.05 * pixels
