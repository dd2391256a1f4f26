"""Extraction for every case in the store: one patient at a time, each family cached.

For each patient and family the pipeline describes the inputs (object SHA-256s, region source,
parameters) without reading pixels, hashes that description, and looks the result up by
(patient, family, extractor, version, input hash). Only misses are computed, so a second run
computes nothing and a new extractor version recomputes only its family. A result is written
in one transaction after it is complete; an input that cannot be used is reported with the
patient and family and leaves nothing behind.

The families, what each reads and stores: :mod:`mrrp_pacs.features.families`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import pydicom

from mrrp_pacs.cases import CaseInputs, ClinicalValue, InstanceRef, ReportRef, case_inputs
from mrrp_pacs.clinical_schema import ClinicalSchema, load_schema
from mrrp_pacs.config import Config
from mrrp_pacs.errors import FeatureError, ModelUnavailable
from mrrp_pacs.features.cache import FeatureCache, FeatureSet, input_hash
from mrrp_pacs.features.families import FAMILY_NAMES, FamilyInput, family_named
from mrrp_pacs.features.wsi import (
    UPSAMPLED,
    Region,
    Tiles,
    TilingParameters,
    open_slide,
    read_region_um,
    region_from_annotation,
    region_from_sidecar,
    region_from_tissue,
    tile_region,
    upsampled,
)
from mrrp_pacs.intake.dicom import PRESENTATION_STATE_CLASSES, SEGMENTATION
from mrrp_pacs.store import Store

if TYPE_CHECKING:  # the encoders pull in torch: imported when first used
    from mrrp_pacs.features.encoders import TileEncoder
    from mrrp_pacs.features.nuclei import NucleusSegmenter
    from mrrp_pacs.features.region import RegionNuclei
    from mrrp_pacs.features.text import TextEncoder
    from mrrp_pacs.features.us_encoder import UsResNet
    from mrrp_pacs.features.us_image import UltrasoundImage
    from mrrp_pacs.features.us_roi import Lesion

LOGGER = logging.getLogger(__name__)

PIPELINE_VERSION = "1"


class FamilyStatus(StrEnum):
    """How one family came out for one patient; ``extract`` counts and prints these values."""

    COMPUTED = "computed"
    CACHED = "cached"
    NO_INPUT = "no_input"
    FAILED = "failed"


@dataclass
class FamilyOutcome:
    patient_key: str
    family: str
    status: FamilyStatus
    reason: str = ""


class FailedFamily(TypedDict):
    patient: str
    family: str
    reason: str


class ExtractionCounts(TypedDict):
    """:meth:`ExtractionSummary.as_dict`: what ``extract --json`` prints."""

    patients: int
    computed: int
    cached: int
    no_input: int
    failed: list[FailedFamily]


@dataclass
class ExtractionSummary:
    outcomes: list[FamilyOutcome] = field(default_factory=list)

    def count(self, status: FamilyStatus) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failures(self) -> list[FamilyOutcome]:
        return [o for o in self.outcomes if o.status == FamilyStatus.FAILED]

    def as_dict(self) -> ExtractionCounts:
        return {
            "patients": len({o.patient_key for o in self.outcomes}),
            "computed": self.count(FamilyStatus.COMPUTED),
            "cached": self.count(FamilyStatus.CACHED),
            "no_input": self.count(FamilyStatus.NO_INPUT),
            "failed": [{"patient": o.patient_key, "family": o.family, "reason": o.reason}
                       for o in self.failures],
        }


class _Encoders:
    """Models loaded once per process, on first use; a model that cannot be loaded stops the
    whole run (:class:`ModelUnavailable`), since every patient would fail the same way."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @cached_property
    def tile(self) -> TileEncoder:
        from mrrp_pacs.features.encoders import build_encoder

        features = self.config.features
        with _model("tile encoder"):
            return build_encoder(features.wsi_encoder, features.encoder_checkpoints,
                                 bf16=features.bf16)

    @cached_property
    def text_version(self) -> str:
        from mrrp_pacs.features.text import text_encoder_version

        features = self.config.features
        with _model("text encoder"):
            return text_encoder_version(features.text_encoder,
                                        _paths(features.text_encoder_paths))

    @cached_property
    def text(self) -> TextEncoder:
        from mrrp_pacs.features.text import build_text_encoder

        features = self.config.features
        with _model("text encoder"):
            return build_text_encoder(features.text_encoder, _paths(features.text_encoder_paths))

    @cached_property
    def us(self) -> tuple[UsResNet, str]:
        from model_store import ModelStore
        from mrrp_pacs.features.us_encoder import load_us_encoder

        with _model("ultrasound encoder"):
            model, stored = load_us_encoder(ModelStore(self.config.paths.model_store_dir),
                                            name=self.config.features.us_encoder)
        return model, stored.version

    @cached_property
    def segmenter(self) -> NucleusSegmenter:
        from mrrp_pacs.features.nuclei import ClassicalSegmenter

        features = self.config.features
        with _model("nucleus model"):
            if features.nuclei_model is None:
                return ClassicalSegmenter()
            from mrrp_pacs.features.hovernet import HoverNetSegmenter

            return HoverNetSegmenter(features.nuclei_model, features.nuclei_model_mpp,
                                     device=features.nuclei_model_device)


@contextmanager
def _model(what: str) -> Iterator[None]:
    from mrrp_pacs.errors import ConfigError, ModelStoreError

    try:
        yield
    except (FeatureError, ModelStoreError, ConfigError) as exc:
        raise ModelUnavailable(f"{what}: {exc}") from exc


def _paths(mapping: dict[str, str]) -> dict[str, Path]:
    return {name: Path(value) for name, value in mapping.items()}


class _Patient:
    """One patient's inputs, with the expensive reads (tiles, US frame) done once."""

    def __init__(self, inputs: CaseInputs, store: Store, config: Config) -> None:
        self.inputs = inputs
        self.store = store
        self.config = config
        self.tiling = TilingParameters(config.features.target_mpp, config.features.tile_px,
                                       config.features.max_tiles)

    def has(self, reads: FamilyInput) -> bool:
        """Whether the patient has what a family reads."""
        match reads:
            case FamilyInput.SLIDE:
                return bool(self.inputs.slides)
            case FamilyInput.ULTRASOUND:
                return bool(self.inputs.us_images)
            case FamilyInput.REPORT:
                return bool(self.inputs.us_reports)
            case FamilyInput.CLINICAL:
                return bool(self.inputs.clinical)

    # -- slide ---------------------------------------------------------------------------

    @cached_property
    def slide_series(self) -> str | None:
        """The slide used: the series with the most instances (the full pyramid)."""
        slides = self.inputs.slides
        return max(sorted(slides), key=lambda s: len(slides[s])) if slides else None

    def slide_description(self) -> list[object]:
        series = self.slide_series
        assert series is not None
        refs = self.inputs.slides[series]
        return [sorted(r.sha256 for r in refs), self._region_description(), self.tiling.key()]

    def _region_description(self) -> list[str]:
        if self.inputs.annotations:
            return ["annotation", *sorted(a.sha256 for a in self.inputs.annotations)]
        series = self.slide_series
        sidecars = [s for s in self.inputs.slide_sidecars if s.image_uid == series]
        if sidecars:
            return [sidecars[0].kind, sidecars[0].sha256]
        return ["automatic"]

    @cached_property
    def tiles(self) -> Tiles:
        series = self.slide_series
        assert series is not None
        name = f"series {series}"
        paths = [self.store.objects.path_for(r.sha256) for r in self.inputs.slides[series]]
        wsi = open_slide(paths, name)
        try:
            source = self._region_description()[0]
            if source == "annotation":
                level0 = self._level0(paths)
                polygons = [p for a in self.inputs.annotations
                            for p in region_from_annotation(self.store.objects.path_for(a.sha256),
                                                            level0)]
            elif source in ("asap", "geojson"):
                sidecar = next(s for s in self.inputs.slide_sidecars if s.image_uid == series)
                polygons = region_from_sidecar(self.store.objects.read_bytes(sidecar.sha256),
                                               f"sidecar {sidecar.row_id}")
            else:
                polygons = region_from_tissue(wsi)
            if not polygons:
                raise FeatureError(f"slide {name}: its region ({source}) holds no polygon")
            return tile_region(wsi, Region(polygons, source), self.tiling, name)
        finally:
            wsi.close()

    def slide_paths(self) -> list[Path]:
        series = self.slide_series
        assert series is not None
        return [self.store.objects.path_for(r.sha256) for r in self.inputs.slides[series]]

    def region_description(self, mpp: float, margin_um: float) -> list[object]:
        """What the region's nuclei depend on beyond the slide: block plan and resolution."""
        features = self.config.features
        return [features.nuclei_block_tiles, margin_um, features.nuclei_region_mm2, mpp]

    def region_nuclei(self, segmenter: NucleusSegmenter, mpp: float, margin_um: float
                      ) -> tuple[RegionNuclei, list[str]]:
        """Nuclei of the blocks around the sampled tiles, each once, read at ``mpp`` µm/px (the
        segmenter's own resolution) with ``margin_um`` of context, and the flags of the read
        (:data:`~mrrp_pacs.features.wsi.UPSAMPLED` when the scan is coarser than ``mpp``)."""
        from mrrp_pacs.features import region

        features = self.config.features
        tiles = self.tiles
        tile_um = tiles.rgb.shape[1] * tiles.mpp
        blocks = region.plan_blocks(tiles.centres_um, tile_um,
                                    block_tiles=features.nuclei_block_tiles,
                                    max_region_mm2=features.nuclei_region_mm2)
        name = f"series {self.slide_series}"
        wsi = open_slide(self.slide_paths(), name)
        try:
            def read(x_um: float, y_um: float, width_um: float, height_um: float,
                     read_mpp: float) -> np.ndarray:
                return read_region_um(wsi, x_um, y_um, width_um, height_um, read_mpp, name)

            def in_a_tile(xy_um: np.ndarray) -> np.ndarray:
                return region.patch_of(xy_um, tiles.centres_um, tile_um) >= 0

            flags = [UPSAMPLED] if upsampled(wsi, mpp) else []
            return region.segment_blocks(blocks, read, segmenter, mpp, margin_um,
                                         measure=in_a_tile), flags
        finally:
            wsi.close()

    @staticmethod
    def _level0(paths: list[Path]) -> pydicom.Dataset:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        return max(headers, key=lambda h: int(h.TotalPixelMatrixColumns))

    # -- ultrasound ------------------------------------------------------------------------

    @cached_property
    def us_choice(self) -> tuple[InstanceRef, tuple[str, str] | None]:
        """(image ref, ROI source (kind, sha256) or None): an image with an ROI if one exists.

        Kind ``sr`` is any object drawing on the image (SR, presentation state or SEG: read by
        its SOP class), ``voc`` a Pascal-VOC sidecar."""
        images = {i.sop_instance_uid: i for i in self.inputs.us_images}
        for sr, target in self.inputs.us_rois:
            if target in images:
                return images[target], ("sr", sr.sha256)
        for sidecar in self.inputs.us_sidecars:
            if sidecar.image_uid in images:
                return images[sidecar.image_uid], ("voc", sidecar.sha256)
        return self.inputs.us_images[0], None

    def us_description(self) -> list[object]:
        from mrrp_pacs.features.us_roi import LESION_ROI_VERSION

        image, roi = self.us_choice
        features = self.config.features
        return [image.sha256, list(roi) if roi else "automatic", features.us_roi_margin_px,
                features.us_default_mm_per_px, f"lesion-roi-{LESION_ROI_VERSION}"]

    @cached_property
    def us_lesion(self) -> tuple[UltrasoundImage, Lesion, list[str]]:
        """(UltrasoundImage of the frame drawn on, the lesion, flags).

        A drawn outline gives a mask on its referenced frame (the middle frame when the SR names
        none); a VOC box or the automatic candidate stands in as a box, flagged ``box_roi``.
        """
        from mrrp_pacs.features import us_roi
        from mrrp_pacs.features.us_image import read_ultrasound

        image_ref, roi = self.us_choice
        path = self.store.objects.path_for(image_ref.sha256)
        ds = pydicom.dcmread(path)
        name = f"image {image_ref.sop_instance_uid}"
        shape = (int(ds.Rows), int(ds.Columns))
        lesion: us_roi.Lesion | None = None
        if roi is not None and roi[0] == "sr":
            drawn = pydicom.dcmread(self.store.objects.path_for(roi[1]))
            sop_class = str(drawn.get("SOPClassUID", ""))
            if sop_class == SEGMENTATION:
                lesions = us_roi.lesions_from_seg(drawn, ds)
            elif sop_class in PRESENTATION_STATE_CLASSES:
                lesions = us_roi.lesions_from_gsps(drawn, ds)
            else:
                lesions = us_roi.lesions_from_sr(drawn, ds)
            lesion = us_roi.largest_lesion(lesions)
        elif roi is not None:
            lesion = us_roi.box_lesion(us_roi.roi_from_voc(self.store.objects.read_bytes(roi[1])),
                                       shape, "voc")
        image = read_ultrasound(ds, frame=None if lesion is None else lesion.frame,
                                source_name=name, roi=None if lesion is None else lesion.box,
                                default_pixel_mm=self.config.features.us_default_mm_per_px)
        flags = list(image.flags)
        if lesion is None:
            assert image.pixel_mm is not None
            try:
                box = us_roi.automatic_lesion_candidate(image.gray, image.pixel_mm)
            except FeatureError as exc:
                raise FeatureError(f"ultrasound {name} has no lesion ROI and {exc}") from exc
            lesion = us_roi.box_lesion(box, shape, "automatic", image.frame)
            flags.append(us_roi.AUTOMATIC_ROI)
        if not lesion.outline:
            flags.append(us_roi.BOX_ROI)
        return image, lesion, flags

    # -- text ------------------------------------------------------------------------------

    @cached_property
    def report(self) -> ReportRef:
        """The latest ultrasound report (the text family is planned only when there is one)."""
        return self.inputs.us_reports[-1]


@dataclass(frozen=True)
class FamilyPlan:
    """One family for one patient, decided before any pixel is read.

    ``inputs`` describes what goes in (object SHA-256s, region source, parameters); its hash,
    with ``extractor`` and ``version``, is the cache key. ``compute`` runs only on a miss.
    """

    extractor: str
    version: str
    inputs: list[object]
    compute: Callable[[], FeatureSet]


class Extractor:
    """Runs the families for patients of one store (one instance per process)."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config
        self.cache = FeatureCache(store)
        self.encoders = _Encoders(config)
        self.schema: ClinicalSchema = load_schema(config.clinical.schema_file)
        self._planners: dict[str, Callable[[_Patient], FamilyPlan]] = {
            "wsi": self._plan_wsi, "nuclei": self._plan_nuclei, "us": self._plan_us,
            "radiomics": self._plan_radiomics, "text": self._plan_text,
            "clinical": self._plan_clinical}

    def run(self, inputs: CaseInputs, families: tuple[str, ...], force: bool) -> list[
            FamilyOutcome]:
        patient = _Patient(inputs, self.store, self.config)
        outcomes = []
        for family in families:
            try:
                outcomes.append(self._family(patient, family, force))
            except ModelUnavailable:
                raise
            except FeatureError as exc:
                outcomes.append(FamilyOutcome(inputs.patient_key, family, FamilyStatus.FAILED,
                                              str(exc)))
                LOGGER.warning("feature family %s failed for one patient (see the summary)",
                               family)
        return outcomes

    def _family(self, patient: _Patient, family: str, force: bool) -> FamilyOutcome:
        key = patient.inputs.patient_key
        # no input: nothing to plan, so a model the family needs is not even loaded
        if not patient.has(family_named(family).reads):
            return FamilyOutcome(key, family, FamilyStatus.NO_INPUT)
        plan = self._planners[family](patient)
        digest = input_hash([PIPELINE_VERSION, family, plan.inputs])
        cached = self.cache.find(key, family, plan.extractor, plan.version, digest)
        if cached is not None and not force:
            self.cache.revive(cached)
            return FamilyOutcome(key, family, FamilyStatus.CACHED)
        features = plan.compute()
        features.extractor, features.version = plan.extractor, plan.version
        features.meta.setdefault("flags", [])
        if cached is not None:  # --force: the same key, recomputed in place
            self.cache.replace(cached, features)
        else:
            self.cache.put(key, digest, features)
        return FamilyOutcome(key, family, FamilyStatus.COMPUTED)

    # -- one plan per family (the patient has what the family reads) -------------------------

    def _plan_clinical(self, patient: _Patient) -> FamilyPlan:
        from mrrp_pacs.features.clinical import CLINICAL_VERSION

        values = patient.inputs.clinical
        description: list[object] = [sorted((k, v.value_text, v.unit)
                                            for k, v in values.items()),
                                     [(v.name, v.kind, v.unit, v.levels)
                                      for v in self.schema.variables]]
        return FamilyPlan("clinical-schema", CLINICAL_VERSION, description,
                          lambda: _clinical(values, self.schema))

    def _plan_wsi(self, patient: _Patient) -> FamilyPlan:
        encoder = self.encoders.tile
        return FamilyPlan(encoder.name, encoder.version, patient.slide_description(),
                          lambda: _wsi(patient, encoder))

    def _plan_nuclei(self, patient: _Patient) -> FamilyPlan:
        from mrrp_pacs.features import morphology, region, topology

        segmenter = self.encoders.segmenter
        version = (f"{segmenter.version}+m{morphology.MORPHOLOGY_VERSION}"
                   f"+t{topology.TOPOLOGY_VERSION}+r{region.REGION_VERSION}")
        features = self.config.features
        mpp = segmenter.mpp if segmenter.mpp is not None else features.target_mpp
        # the configured context, or more where the segmenter needs more (a model's own)
        margin_um = max(features.nuclei_margin_um, segmenter.context_um)
        return FamilyPlan(segmenter.name, version,
                          [*patient.slide_description(),
                           patient.region_description(mpp, margin_um)],
                          lambda: _nuclei(patient, segmenter, mpp, margin_um))

    def _plan_us(self, patient: _Patient) -> FamilyPlan:
        model, version = self.encoders.us
        return FamilyPlan("usresnet", version, patient.us_description(),
                          lambda: _us(patient, model))

    def _plan_radiomics(self, patient: _Patient) -> FamilyPlan:
        from mrrp_pacs.features import radiomics

        return FamilyPlan("pyradiomics", radiomics.RADIOMICS_VERSION, patient.us_description(),
                          lambda: _radiomics(patient))

    def _plan_text(self, patient: _Patient) -> FamilyPlan:
        report = patient.report
        patterns = tuple(self.config.features.findings_patterns)
        return FamilyPlan(self.config.features.text_encoder, self.encoders.text_version,
                          [report.row_id, report.text, patterns],
                          lambda: _text(patient, self.encoders.text, patterns))


# -- the families ---------------------------------------------------------------------------

def _clinical(values: dict[str, ClinicalValue], schema: ClinicalSchema) -> FeatureSet:
    from mrrp_pacs.features.clinical import encode_clinical

    return encode_clinical(values, schema)


def _wsi(patient: _Patient, encoder: TileEncoder) -> FeatureSet:
    tiles = patient.tiles
    deep = encoder.encode(tiles.rgb, tiles.mpp)
    return FeatureSet("wsi", encoder.name, encoder.version,
                      {"deep": deep.astype(np.float32),
                       "positions_um": tiles.centres_um.astype(np.float32)},
                      {"flags": tiles.flags, "mpp": tiles.mpp, "tile_px": tiles.rgb.shape[1],
                       "region": patient._region_description()[0]})


def _nuclei(patient: _Patient, segmenter: NucleusSegmenter, mpp: float, margin_um: float
            ) -> FeatureSet:
    """Nuclei over the region (blocks with margins, each nucleus once), one k-NN graph over all
    of them, then per sampled tile a morphology and a topology token (the wsi family's tiles,
    in its order)."""
    from mrrp_pacs.features import morphology, region, topology

    tiles = patient.tiles
    tile_um = tiles.rgb.shape[1] * tiles.mpp
    # the classical segmenter estimates the stain per block (4 x 4 tiles and the margin): one
    # estimate pooled over the slide's tiles followed the lymphocyte load less well (docs)
    found, read_flags = patient.region_nuclei(segmenter, mpp, margin_um)
    patch = region.patch_of(found.xy_um, tiles.centres_um, tile_um)
    node, _node_names = topology.node_features(found.xy_um, found.kinds.astype(np.int64))
    in_patch = patch >= 0
    topo, topo_names = topology.patch_tokens(node[in_patch], found.kinds[in_patch].astype(
        np.int64), patch[in_patch], len(tiles.rgb))
    morph_tokens: list[np.ndarray] = []
    morph_names: list[str] = []
    for index in range(len(tiles.rgb)):
        mine = patch == index
        token, morph_names = morphology.patch_token(found.features[mine], found.kinds[mine],
                                                    whole=found.whole[mine])
        morph_tokens.append(token)
    counts = np.stack([np.bincount(found.kinds[patch == i].astype(np.int64), minlength=4)
                       for i in range(len(tiles.rgb))]).astype(np.float32)
    return FeatureSet("nuclei", segmenter.name, "", {
        "morphology": np.stack(morph_tokens).astype(np.float32),
        "topology": topo.astype(np.float32),
        "counts": counts,
        "positions_um": tiles.centres_um.astype(np.float32),
    }, {"flags": tiles.flags + read_flags, "morphology_names": morph_names,
        "topology_names": topo_names,
        "count_names": ["tumour", "inflammatory", "stromal", "normal"],
        "graph_nuclei": len(found.kinds), "region_blocks": found.n_blocks,
        "mpp": mpp, "context_um": margin_um})


def _us(patient: _Patient, model: UsResNet) -> FeatureSet:
    from mrrp_pacs.features import us_encoder

    image, lesion, flags = patient.us_lesion
    # the paper's ROI: the lesion's bounding box (of the mask) + margin
    crop = us_encoder.crop_roi(image.gray, lesion.box, patient.config.features.us_roi_margin_px)
    tokens = us_encoder.encode_crops(model, crop[None])[0]
    return FeatureSet("us", "usresnet", "", {
        "tokens": tokens.astype(np.float32),
        "positions": us_encoder.token_positions().astype(np.int16),
        "box_px": np.asarray(lesion.box, dtype=np.float32),
        "roi_is_outline": np.asarray([lesion.outline], dtype=bool),
    }, _lesion_meta(patient, image, lesion, flags))


def _lesion_meta(patient: _Patient, image: UltrasoundImage, lesion: Lesion, flags: list[str]
                 ) -> dict[str, object]:
    """What the US families record about their ROI: ``roi_shape`` says whether the features
    describe a drawn outline (``outline``) or a box standing in for one (``box``)."""
    return {"flags": flags, "pixel_mm": list(image.pixel_mm or []),
            "image_uid": patient.us_choice[0].sop_instance_uid,
            "roi_source": lesion.source, "roi_shape": lesion.roi_shape,
            "frame": image.frame + 1, "lesion_label": lesion.label,
            "lesion_pixels": int(lesion.mask.sum())}


def _radiomics(patient: _Patient) -> FeatureSet:
    from mrrp_pacs.features import radiomics

    image, lesion, flags = patient.us_lesion
    assert image.pixel_mm is not None
    tokens, token_names, feature_names = radiomics.radiomics_tokens(image.gray, lesion.mask,
                                                                    image.pixel_mm)
    meta = _lesion_meta(patient, image, lesion, flags)
    meta.update(token_names=token_names, feature_names=feature_names)
    return FeatureSet("radiomics", "pyradiomics", radiomics.RADIOMICS_VERSION,
                      {"tokens": tokens.astype(np.float32),
                       "roi_is_outline": np.asarray([lesion.outline], dtype=bool)}, meta)


def _text(patient: _Patient, encoder: TextEncoder, patterns: tuple[str, ...]) -> FeatureSet:
    from mrrp_pacs.features.text import DEFAULT_PATTERNS, findings

    report = patient.report
    text = findings(report.text, patterns or DEFAULT_PATTERNS, source=f"report row "
                    f"{report.row_id}")
    tokens = encoder.embed(text)
    return FeatureSet("text", encoder.name, encoder.version, {"tokens": tokens},
                      {"flags": [], "n_tokens": int(tokens.shape[0])})


def lesion_crops(store: Store, config: Config, exclude: Collection[str] = ()
                 ) -> tuple[np.ndarray, list[str]]:
    """(n, 256, 256) crops of every annotated ultrasound lesion (the encoder's training set),
    and why other images were left out. Automatic lesion candidates are not trained on.

    ``exclude`` holds patient keys or patient ids left out (a test split: an encoder that has
    seen the test patients' images is not a fair test of the model built on it)."""
    from mrrp_pacs.features.us_encoder import CROP_SIZE_PX, crop_roi

    crops, skipped = [], []
    for inputs in case_inputs(store, config).values():
        if not inputs.us_images or inputs.patient_key in exclude or inputs.patient_id in exclude:
            continue
        patient = _Patient(inputs, store, config)
        if patient.us_choice[1] is None:
            skipped.append(f"{inputs.patient_key}: no annotated lesion")
            continue
        try:
            image, lesion, _ = patient.us_lesion
        except FeatureError as exc:
            skipped.append(f"{inputs.patient_key}: {exc}")
            continue
        crops.append(crop_roi(image.gray, lesion.box, config.features.us_roi_margin_px))
    empty = np.zeros((0, CROP_SIZE_PX, CROP_SIZE_PX), np.float32)
    return (np.stack(crops) if crops else empty), skipped


# -- running over the store -----------------------------------------------------------------

_WORKER: Extractor | None = None


def _start_worker(db_path: Path, objects: Path, config: Config) -> None:
    """Pool initializer: one store connection and one set of loaded models per process."""
    import torch

    global _WORKER
    torch.set_num_threads(1)  # the workers share the cores: one thread each avoids thrashing
    _WORKER = Extractor(Store(db_path, objects), config)


def _work(inputs: CaseInputs, families: tuple[str, ...], force: bool) -> list[FamilyOutcome]:
    assert _WORKER is not None
    return _WORKER.run(inputs, families, force)


def extract(store: Store, config: Config, families: tuple[str, ...] = FAMILY_NAMES,
            force: bool = False, workers: int = 1,
            progress: Callable[[int], None] | None = None,
            patient_keys: Collection[str] | None = None) -> ExtractionSummary:
    """Extract ``families`` for every patient in the store (or those of ``patient_keys``)."""
    unknown = set(families) - set(FAMILY_NAMES)
    if unknown:
        raise ValueError(f"unknown feature families {sorted(unknown)}; known: {FAMILY_NAMES}")
    everything = [inputs for key, inputs in case_inputs(store, config).items()
                  if patient_keys is None or key in patient_keys]
    summary = ExtractionSummary()
    if workers <= 1:
        extractor = Extractor(store, config)
        for inputs in everything:
            summary.outcomes.extend(extractor.run(inputs, families, force))
            if progress is not None:
                progress(1)
        return summary
    with ProcessPoolExecutor(max_workers=workers, initializer=_start_worker,
                             initargs=(store.db_path, store.objects.root, config)) as pool:
        futures = [pool.submit(_work, inputs, families, force) for inputs in everything]
        for future in as_completed(futures):
            summary.outcomes.extend(future.result())
            if progress is not None:
                progress(1)
    return summary
