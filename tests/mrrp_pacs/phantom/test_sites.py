"""Sites differ in how they acquire, not in what they acquire (issue 15, "not a mirror").

The stain vectors are estimated from the rendered RGB by an independent implementation
(torchstain's Macenko), not read back from the renderer.
"""

import csv
import json
from itertools import combinations

import numpy as np
import pydicom
import pytest
from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer
from validators import dciodvfy
from wsidicom import WsiDicom

from mrrp_pacs.phantom.cohort import TRAITS
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.phantom.histology import render_slide
from mrrp_pacs.phantom.sites import SITES
from mrrp_pacs.phantom.ultrasound import render_frame

THREE = SITES[:3]
PLAN_PX = 512  # 256 µm of section
MIN_HEMATOXYLIN_ANGLE_DEG = 8.0  # between the estimated vectors of any two of the three sites
MAX_ESTIMATE_ERROR_DEG = 3.0  # estimated hematoxylin vs the site's own


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _site_slide(site, seed: int = 2):
    side_px = round(PLAN_PX * 0.5 / site.scanner.mpp)
    return render_slide(np.random.default_rng(seed), dict.fromkeys(TRAITS, 0.3), side_px,
                        site.scanner.mpp, site.stain)


def test_same_section_and_nuclei_at_every_site_in_micrometres():
    slides = [_site_slide(site) for site in THREE]
    reference = slides[0]
    for site, slide in zip(THREE, slides, strict=True):
        assert slide.rgb.shape[0] * site.scanner.mpp == PLAN_PX * 0.5
        for column in ("kind", "major_um", "minor_um", "angle_rad", "stain"):
            assert np.array_equal(getattr(slide.nuclei, column),
                                  getattr(reference.nuclei, column))
        for column in ("x_px", "y_px"):
            assert np.allclose(getattr(slide.nuclei, column) * site.scanner.mpp,
                               getattr(reference.nuclei, column) * 0.5, atol=1e-3)
    assert len(reference.nuclei) > 50


def test_same_lesion_in_millimetres_on_every_ultrasound_machine():
    traits = {"us_margin": 0.8, "us_orientation": 0.3, "us_shadowing": 1.0,
              "us_heterogeneity": 0.2, "vascularity": 0.0}
    outlines_mm = []
    for site in SITES:
        machine = site.ultrasound
        frame = render_frame(np.random.default_rng(4), traits, 18.0, machine.rows,
                             machine.columns, machine.pixel_mm, machine.gain_db, machine.frames)
        assert frame.pixels.shape == (machine.rows, machine.columns)
        if machine.frames > 1:
            assert frame.cine is not None and frame.cine.shape[0] == machine.frames
            assert np.array_equal(frame.cine[machine.frames // 2], frame.pixels)
            assert not np.array_equal(frame.cine[0], frame.cine[1])  # fresh speckle
        # lesion outline relative to the frame's centre line, in mm
        outlines_mm.append(frame.lesion_outline_px * machine.pixel_mm
                           - [machine.width_mm / 2, 0])
    for outline in outlines_mm[1:]:
        assert np.allclose(outline, outlines_mm[0], atol=1e-6)
    assert len({site.ultrasound.frames for site in SITES}) > 1


def test_stain_vectors_estimated_from_the_pixels_differ_between_sites():
    hematoxylin = {}
    for site in THREE:
        slide = _site_slide(site)
        step = round(0.5 / site.scanner.mpp)  # the same number of pixels from every site
        rgb = np.ascontiguousarray(slide.rgb[::step, ::step])
        estimator = NumpyMacenkoNormalizer()
        estimator.fit(rgb)
        hematoxylin[site.code] = estimator.HERef[:, 0]
        error = _angle_deg(hematoxylin[site.code], site.stain.hematoxylin_od)
        assert error <= MAX_ESTIMATE_ERROR_DEG, f"site {site.code}: {error:.1f}°"
        # the empty glass (a corner outside the section) is the site's
        corner = np.median(slide.rgb[:8, :8].reshape(-1, 3), axis=0)
        assert np.abs(corner - np.asarray(site.stain.glass_rgb)).max() <= 2.5
    for a, b in combinations(hematoxylin, 2):
        angle = _angle_deg(hematoxylin[a], hematoxylin[b])
        assert angle >= MIN_HEMATOXYLIN_ANGLE_DEG, f"sites {a} and {b}: {angle:.1f}°"


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    spec = PhantomSpec(patients=3, seed=12, slide_px=512, missing_wsi=0.0, missing_us=0.0,
                       missing_report=0.0, sites=3)
    generate(spec, root / "three", workers=2)
    generate(PhantomSpec(**{**spec.__dict__, "sites": 1}), root / "one", workers=1)
    return root


def _walk(ds):
    """Every item of every sequence in ``ds``, depth first."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield item
                yield from _walk(item)


def _truth(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_each_site_writes_its_own_acquisition_with_the_same_traits(three_sites):
    truth = _truth(three_sites / "three" / "truth.csv")
    single = _truth(three_sites / "one" / "truth.csv")
    assert [row["site"] for row in truth] == ["A", "B", "C"]
    for row, same in zip(truth, single, strict=True):
        # the cohort (traits, outcomes) does not depend on how many sites acquire it
        assert {k: v for k, v in row.items() if k != "site"} == \
            {k: v for k, v in same.items() if k != "site"}
    summary = json.loads((three_sites / "three" / "phantom.json").read_text())
    assert sorted(summary["sites"]) == ["A", "B", "C"]
    descriptions = set()
    for row, site in zip(truth, THREE, strict=True):
        folder = three_sites / "three" / "dicom" / row["patient_id"]
        with WsiDicom.open(folder / "slide") as wsi:
            assert wsi.levels[0].mpp.width == pytest.approx(site.scanner.mpp)
            assert wsi.size.width * site.scanner.mpp == pytest.approx(512 * 0.5)
        level0 = pydicom.dcmread(folder / "slide" / "level-0.dcm", stop_before_pixels=True)
        image = pydicom.dcmread(folder / "us" / "image.dcm", stop_before_pixels=True)
        (region,) = image.SequenceOfUltrasoundRegions
        assert region.PhysicalDeltaX == pytest.approx(site.ultrasound.pixel_mm / 10)
        assert (image.Rows, image.Columns) == (site.ultrasound.rows, site.ultrasound.columns)
        assert int(image.get("NumberOfFrames", 1)) == site.ultrasound.frames
        roi = pydicom.dcmread(folder / "us" / "lesion-roi.dcm")
        frames = [item.ReferencedFrameNumber for item in _walk(roi)
                  if "ReferencedFrameNumber" in item]
        assert frames == ([site.ultrasound.frames // 2 + 1] if site.ultrasound.frames > 1
                          else [])
        for ds, station in ((level0, site.wsi_station), (image, site.us_station)):
            assert ds.StationName == station and ds.InstitutionName == site.institution
            assert ds.BodyPartExamined == "BREAST" and ds.ImageLaterality in ("R", "L")
            assert ds.StudyDescription and ds.SeriesDescription
            descriptions.add(ds.StudyDescription)
        assert level0.Manufacturer == site.scanner.manufacturer
        assert image.ManufacturerModelName == site.ultrasound.model
    assert len(descriptions) == 6  # every site words its studies its own way


@pytest.mark.needs_tool("dciodvfy")
def test_every_site_object_passes_dciodvfy(three_sites):
    files = sorted((three_sites / "three").rglob("*.dcm"))
    assert len(files) == 3 * 6
    for path in files:
        errors, warnings = dciodvfy(path)
        assert errors + warnings == [], f"{path.name}: {errors + warnings}"


def test_cli_refuses_more_sites_than_it_knows(tmp_path):
    from click.testing import CliRunner

    from mrrp_pacs.cli import main

    result = CliRunner().invoke(main, ["phantom", "--patients", "2", "--seed", "1", "--out",
                                       str(tmp_path / "p"), "--sites", str(len(SITES) + 1)])
    assert result.exit_code == 2
    assert f"--sites must be between 1 and {len(SITES)}" in result.output
    assert not (tmp_path / "p").exists()
