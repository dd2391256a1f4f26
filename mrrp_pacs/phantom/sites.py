"""The hospitals of the phantom: each site scans slides and images lesions its own way.

A real cohort comes from several sites, and what differs between them is the acquisition, not
the biology: the stain batch (its hematoxylin and eosin optical-density vectors), the glass and
illumination (the colour of an empty field), the scanner's resolution and JPEG quality, the
ultrasound machine (gain, field of view, pixel spacing) and the naming of studies and series.
:data:`SITES` lists them; ``phantom --sites K`` spreads the patients over the first K. The traits
are rendered identically at every site: :func:`render_slide` lays out tissue and nuclei in
micrometres, :func:`render_frame` the lesion in millimetres, and a site only chooses how they are
recorded.

Site A keeps the look the phantom had before sites existed (so ``--sites 1`` writes the same
pixels); the others use stain vectors estimated on real H&E slides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StainBatch:
    """One lab's H&E: unit optical-density vectors (R, G, B) and the empty glass.

    ``glass_rgb`` is the colour of a field with no tissue as the scanner records it (white
    balance, mounting medium and slide together): its optical density is added to every pixel.
    """

    hematoxylin_od: tuple[float, float, float]
    eosin_od: tuple[float, float, float]
    glass_rgb: tuple[float, float, float]
    source: str

    def __post_init__(self) -> None:
        for name in ("hematoxylin_od", "eosin_od"):
            vector = np.asarray(getattr(self, name), float)
            if vector.shape != (3,) or np.any(vector <= 0):
                raise ValueError(f"{name} must be three positive optical densities, got "
                                 f"{getattr(self, name)}")
        if not all(0 < v <= 255 for v in self.glass_rgb):
            raise ValueError(f"glass_rgb must lie in (0, 255], got {self.glass_rgb}")

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(3,) float32 hematoxylin and eosin vectors as published (each near unit length)."""
        return (np.asarray(self.hematoxylin_od, np.float32),
                np.asarray(self.eosin_od, np.float32))

    def glass_od(self) -> np.ndarray:
        """(3,) float32 optical density of the empty glass, per channel."""
        return (-np.log(np.asarray(self.glass_rgb, np.float64) / 255.0)).astype(np.float32)


@dataclass(frozen=True)
class SlideScanner:
    """A whole-slide scanner: base-level resolution and JPEG quality of its pyramid tiles."""

    manufacturer: str
    model: str
    mpp: float  # µm/px of the base level
    jpeg_quality: int

    def __post_init__(self) -> None:
        if not 0.1 <= self.mpp <= 2.0:
            raise ValueError(f"scanner mpp must be in [0.1, 2] µm/px, got {self.mpp}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"JPEG quality must be in [1, 95], got {self.jpeg_quality}")


@dataclass(frozen=True)
class UltrasoundMachine:
    """A B-mode machine with a linear probe: field of view, pixel spacing and gain."""

    manufacturer: str
    model: str
    pixel_mm: float
    depth_mm: float  # field of view, skin to the bottom row
    width_mm: float
    gain_db: float  # overall receive gain before log compression; 0 is the phantom's reference
    frames: int = 1  # > 1: the machine stores a cine loop (Ultrasound Multi-frame Image)
    frame_rate_hz: float = 20.0

    def __post_init__(self) -> None:
        if self.pixel_mm <= 0:
            raise ValueError(f"ultrasound pixel spacing must be positive, got {self.pixel_mm}")
        if self.frames < 1 or self.frame_rate_hz <= 0:
            raise ValueError(f"an ultrasound machine stores at least one frame at a positive "
                             f"rate, got {self.frames} at {self.frame_rate_hz} Hz")

    @property
    def rows(self) -> int:
        return round(self.depth_mm / self.pixel_mm)

    @property
    def columns(self) -> int:
        return round(self.width_mm / self.pixel_mm)


@dataclass(frozen=True)
class Site:
    """One hospital: its station names, descriptions, stain batch, scanner and US machine.

    ``study_descriptions`` and ``series_descriptions`` are ``str.format`` templates with
    ``{side}`` (``RIGHT``/``LEFT``) and ``{lat}`` (``R``/``L``): each PACS words them its own way.
    """

    code: str
    institution: str
    stain: StainBatch
    scanner: SlideScanner
    ultrasound: UltrasoundMachine
    wsi_station: str
    us_station: str
    pathology_study: str
    pathology_series: str
    us_study: str
    us_series: str


# Optical-density vectors (R, G, B) as their sources publish them.
RUIFROK_JOHNSTON = StainBatch(
    # Ruifrok & Johnston, "Quantification of histochemical staining by color deconvolution",
    # Anal Quant Cytol Histol 23:291 (2001), Table 1, H&E: the phantom's original look.
    hematoxylin_od=(0.65, 0.70, 0.29), eosin_od=(0.07, 0.99, 0.11),
    glass_rgb=(float(255 * np.exp(-0.02)),) * 3,  # OD 0.02 per channel: near-white (RGB 250)
    source="Ruifrok & Johnston 2001, Table 1")
MACENKO_REFERENCE = StainBatch(
    # The reference H&E matrix of Macenko et al. (ISBI 2009) in the reference implementation
    # (github.com/mitkovetta/staining-normalization, HERef), as torchstain 1.4.1 ships it.
    hematoxylin_od=(0.5626, 0.7201, 0.4062), eosin_od=(0.2159, 0.8012, 0.5581),
    # the background QuPath estimated on a real breast-tumour slide (zqy396/ML_TSR, cells.groovy)
    glass_rgb=(236.0, 229.0, 236.0),
    source="Macenko et al. 2009 reference matrix (mitkovetta/staining-normalization)")
BLUE_HEMATOXYLIN = StainBatch(
    # Vectors QuPath 0.3.2 estimated ("H&E estimated") on an Aperio SVS slide (0.49 µm/px) in a
    # published TIL-scoring script for non-small cell lung cancer: a bluer hematoxylin and a
    # more violet eosin than Ruifrok-Johnston.
    hematoxylin_od=(0.83459, 0.47582, 0.27759), eosin_od=(0.24581, 0.68069, 0.6901),
    glass_rgb=(228.0, 230.0, 241.0),  # a cool, slightly blue white balance
    source="QuPath-estimated vectors, NSCLC TIL script (Aperio SVS)")
QUPATH_BREAST = StainBatch(
    # QuPath "H&E estimated" vectors and background of a real breast-tumour slide
    # (zqy396/ML_TSR, cells.groovy)
    hematoxylin_od=(0.63384, 0.68143, 0.36594), eosin_od=(0.18266, 0.81887, 0.54414),
    glass_rgb=(240.0, 233.0, 226.0),  # a warm, slightly yellow white balance
    source="QuPath-estimated vectors, zqy396/ML_TSR cells.groovy")

# The reference machine: the frame the phantom drew before sites (480 x 640 px at 0.1 mm).
REFERENCE_US = UltrasoundMachine("Phantom Sonics", "LP-10 linear", pixel_mm=0.1, depth_mm=48.0,
                                 width_mm=64.0, gain_db=0.0)

# Names are fictional: a phantom must not pass for a real vendor's product.
SITES: tuple[Site, ...] = (
    Site(code="A", institution="Phantom General Hospital", stain=RUIFROK_JOHNSTON,
         scanner=SlideScanner("Phantom Scanners", "PS-20", mpp=0.5, jpeg_quality=90),
         ultrasound=REFERENCE_US, wsi_station="PGH-PATH-SCAN1", us_station="PGH-US-ROOM2",
         pathology_study="Breast core biopsy H&E", pathology_series="H&E {side} breast",
         us_study="US breast", us_series="Breast ultrasound"),
    Site(code="B", institution="Phantom University Medical Centre", stain=MACENKO_REFERENCE,
         scanner=SlideScanner("Lumen Slide Systems", "LX-40", mpp=0.25, jpeg_quality=80),
         ultrasound=UltrasoundMachine("Echolab", "EL-7 L12-5", pixel_mm=0.08, depth_mm=40.0,
                                      width_mm=50.0, gain_db=3.0, frames=5,
                                      frame_rate_hz=25.0),
         wsi_station="PUMC-DP-02", us_station="PUMC-US-BREAST",
         pathology_study="PATHOLOGY BREAST {lat}", pathology_series="HE 40X",
         us_study="US BREAST UNILAT {side}", us_series="B-MODE {side} BREAST"),
    Site(code="C", institution="Phantom Regional Hospital", stain=BLUE_HEMATOXYLIN,
         scanner=SlideScanner("Histoscan", "HS-2", mpp=0.5, jpeg_quality=75),
         ultrasound=UltrasoundMachine("Sonavis", "SV-3 L9", pixel_mm=0.12, depth_mm=45.0,
                                      width_mm=60.0, gain_db=-2.0),
         wsi_station="PRH-HISTO", us_station="PRH-USS-1",
         pathology_study="Histology - breast", pathology_series="Digital slide H&E 20x",
         us_study="Ultrasound {side} breast", us_series="{side} breast lesion"),
    Site(code="D", institution="Phantom Women's Clinic", stain=QUPATH_BREAST,
         scanner=SlideScanner("Lumen Slide Systems", "LX-20", mpp=0.25, jpeg_quality=85),
         ultrasound=UltrasoundMachine("Echolab", "EL-5 L10", pixel_mm=0.1, depth_mm=42.0,
                                      width_mm=56.0, gain_db=1.5, frames=3),
         wsi_station="PWC-SCAN", us_station="PWC-US-A",
         pathology_study="Breast pathology", pathology_series="H&E scan",
         us_study="Breast US {side}", us_series="Breast {lat}"),
)


def describe(template: str, laterality: str) -> str:
    """Fill a site's description template for ``laterality`` ``R`` or ``L``."""
    return template.format(side="RIGHT" if laterality == "R" else "LEFT", lat=laterality)
