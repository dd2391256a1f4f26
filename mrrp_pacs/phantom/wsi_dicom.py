"""Write a synthetic slide as a DICOM VL Whole Slide Microscopy Image pyramid.

One Part-10 file per pyramid level, each a TILED_FULL multi-frame instance of JPEG baseline
tiles (PhotometricInterpretation YBR_FULL_422, i.e. 4:2:2 chroma subsampling), all levels in one
series sharing one frame of reference and one PyramidUID.

The files are written with pydicom directly rather than through wsidicom's writer: TILED_FULL
needs no per-frame functional groups, so a level is just a header plus encapsulated tiles that
Pillow encodes, and every attribute (and therefore every byte) stays under our control, which
keeps the output deterministic. Every UID is derived from :attr:`SlideIdentity.uid_seed` and
every date from the study date, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageCms
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
)
from pydicom.valuerep import format_number_as_ds

from mrrp_pacs import __version__
from mrrp_pacs.phantom.dicom_objects import phantom_uid

# A typical FFPE section; the IOD wants a depth for a VOLUME image.
SECTION_THICKNESS_UM = 4.0

# Pillow's `subsampling=1` is 4:2:2, the subsampling YBR_FULL_422 declares.
_PILLOW_SUBSAMPLING_422 = 1


@dataclass(frozen=True)
class SlideIdentity:
    """Who and what the slide belongs to; DICOM-formatted strings (PN, DA ``YYYYMMDD``, TM)."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_instance_uid: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    uid_seed: str  # every UID of the pyramid is derived from it (see :func:`pyramid_uids`)
    container_identifier: str  # the slide label, e.g. "P0001-A1"; also the specimen identifier
    # what a PACS study list shows, and the scanner (a site's, see mrrp_pacs.phantom.sites)
    study_description: str = ""
    series_description: str = "Synthetic H&E"
    laterality: str = ""  # R or L: the breast the specimen comes from (a paired body part)
    body_part_examined: str = ""
    manufacturer: str = "mrrp-pacs"
    manufacturer_model_name: str = "phantom"
    station_name: str = ""
    institution_name: str = ""


@dataclass(frozen=True)
class PyramidUids:
    """The UIDs a pyramid written for one :class:`SlideIdentity` uses (all from its seed)."""

    uid_seed: str
    series_instance_uid: UID
    frame_of_reference_uid: UID
    pyramid_uid: UID
    dimension_organization_uid: UID
    specimen_uid: UID

    def sop_instance_uid(self, level: int) -> UID:
        """SOP Instance UID of pyramid level ``level`` (0 is full resolution)."""
        return phantom_uid(self.uid_seed, f"instance-{level}")


def srgb_icc_profile() -> bytes:
    """An sRGB ICC profile with a fixed creation date.

    lcms stamps the current time into the header (bytes 24-35, ICC.1 §7.2.1); a fixed date
    keeps the files byte-identical. The profile ID (bytes 84-99) is left zero, "not computed".
    """
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[24:36] = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)
    return bytes(profile)


def pyramid_uids(identity: SlideIdentity) -> PyramidUids:
    """UIDs that :func:`write_wsi_pyramid` gives the pyramid of ``identity``.

    Parameters
    ----------
    identity
        The slide; only ``uid_seed`` is used.

    Returns
    -------
    PyramidUids
        Series, frame of reference, pyramid, dimension organization and specimen UIDs, and the
        per-level SOP Instance UIDs through :meth:`PyramidUids.sop_instance_uid`.
    """
    seed = identity.uid_seed
    return PyramidUids(
        uid_seed=seed,
        series_instance_uid=phantom_uid(seed, "series"),
        frame_of_reference_uid=phantom_uid(seed, "frame-of-reference"),
        pyramid_uid=phantom_uid(seed, "pyramid"),
        dimension_organization_uid=phantom_uid(seed, "dimension-organization"),
        specimen_uid=phantom_uid(seed, "specimen"),
    )


def write_wsi_pyramid(image: np.ndarray, mpp: float, identity: SlideIdentity, out_dir: Path,
                      *, tile_px: int = 256, min_levels: int = 3,
                      jpeg_quality: int = 90) -> list[Path]:
    """Write ``image`` as a VL Whole Slide Microscopy Image pyramid, one file per level.

    Level ``k`` is level 0 area-averaged ``2**k`` times (each step averages 2x2 blocks, dropping
    an odd last row or column so the pixel spacing doubles exactly). Levels are added until the
    whole level fits in one tile, and at least ``min_levels`` are written.

    Parameters
    ----------
    image
        Level 0, shape (rows, cols, 3), uint8 RGB.
    mpp
        Level-0 pixel size in µm/px (square pixels).
    identity
        Patient, study and slide attributes, and the seed of every UID.
    out_dir
        Folder to write ``level-<k>.dcm`` files into; created if missing.
    tile_px
        Tile edge in px; edge tiles are padded by repeating the last row/column.
    min_levels
        Fewest pyramid levels to write.
    jpeg_quality
        Pillow JPEG quality, 1-95.

    Returns
    -------
    list of Path
        The written files, level 0 first.

    Raises
    ------
    ValueError
        If ``image`` is not (rows, cols, 3) uint8, ``mpp`` is not positive, or the image is too
        small for ``min_levels`` levels.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (rows, cols, 3) uint8, got {image.shape} {image.dtype}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    rows, cols = image.shape[:2]
    n_levels = 1
    while max(rows, cols) >> (n_levels - 1) > tile_px:
        n_levels += 1
    n_levels = max(n_levels, min_levels)
    if min(rows, cols) >> (n_levels - 1) == 0:
        raise ValueError(f"a {rows}x{cols} image is too small for {n_levels} levels")

    out_dir.mkdir(parents=True, exist_ok=True)
    uids = pyramid_uids(identity)
    icc_profile = srgb_icc_profile()
    paths = []
    level_image = Image.fromarray(image)
    for level in range(n_levels):
        if level:
            width, height = level_image.size
            level_image = level_image.reduce(2, box=(0, 0, width // 2 * 2, height // 2 * 2))
        tiles = _encode_tiles(level_image, tile_px, jpeg_quality)
        dataset = _level_dataset(level_image.size, tiles, level, mpp * 2**level / 1000.0,
                                 tile_px, identity, uids, icc_profile)
        path = out_dir / f"level-{level}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _encode_tiles(level_image: Image.Image, tile_px: int, quality: int) -> list[bytes]:
    """JPEG tiles in row-major order (TILED_FULL frame order)."""
    width, height = level_image.size
    tiles = []
    for top in range(0, height, tile_px):
        for left in range(0, width, tile_px):
            tile = level_image.crop((left, top, min(left + tile_px, width),
                                     min(top + tile_px, height)))
            if tile.size != (tile_px, tile_px):
                # Repeat the border rather than pad with black: a hard edge would ring into
                # the real pixels of the tile after JPEG compression.
                pixels = np.asarray(tile)
                pad = ((0, tile_px - pixels.shape[0]), (0, tile_px - pixels.shape[1]), (0, 0))
                tile = Image.fromarray(np.pad(pixels, pad, mode="edge"))
            buffer = io.BytesIO()
            tile.save(buffer, format="JPEG", quality=quality,
                      subsampling=_PILLOW_SUBSAMPLING_422)
            tiles.append(buffer.getvalue())
    return tiles


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _level_dataset(size: tuple[int, int], tiles: list[bytes], level: int, spacing_mm: float,
                   tile_px: int, identity: SlideIdentity, uids: PyramidUids,
                   icc_profile: bytes) -> Dataset:
    """The Part-10 dataset of one level; ``size`` is (columns, rows) of the level in px."""
    columns, rows = size
    image_type = (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0
                  else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
    sop_instance_uid = uids.sop_instance_uid(level)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit

    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = image_type
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = identity.study_date
    ds.SeriesDate = identity.study_date
    ds.ContentDate = identity.study_date
    ds.AcquisitionDateTime = identity.study_date + identity.study_time
    ds.StudyTime = identity.study_time
    ds.SeriesTime = identity.study_time
    ds.ContentTime = identity.study_time
    ds.AccessionNumber = identity.accession_number
    ds.Modality = "SM"
    ds.Manufacturer = identity.manufacturer
    ds.ReferringPhysicianName = ""
    if identity.study_description:
        ds.StudyDescription = identity.study_description
    ds.SeriesDescription = identity.series_description
    ds.ManufacturerModelName = identity.manufacturer_model_name
    if identity.institution_name:
        ds.InstitutionName = identity.institution_name
    if identity.station_name:
        ds.StationName = identity.station_name
    if identity.body_part_examined:
        ds.BodyPartExamined = identity.body_part_examined
    if identity.laterality:
        # Image Laterality, not the series' Laterality: dciodvfy rejects the latter on a WSI
        # (General Series 2C, "may not be present otherwise")
        ds.ImageLaterality = identity.laterality
    ds.VolumetricProperties = "VOLUME"
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.IssuerOfPatientID = identity.issuer_of_patient_id
    ds.PatientBirthDate = identity.patient_birth_date
    ds.PatientSex = identity.patient_sex
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = __version__
    ds.StudyInstanceUID = identity.study_instance_uid
    ds.SeriesInstanceUID = uids.series_instance_uid
    ds.StudyID = identity.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = level + 1
    ds.FrameOfReferenceUID = uids.frame_of_reference_uid
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.DimensionOrganizationSequence = [
        _item(DimensionOrganizationUID=uids.dimension_organization_uid)]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = len(tiles)
    ds.Rows = tile_px
    ds.Columns = tile_px
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = _ds(round(
        len(tiles) * tile_px * tile_px * 3 / sum(len(tile) for tile in tiles), 2))
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    # Imaged volume width/height are in mm, depth in µm (PS3.3 C.8.12.4.1).
    ds.ImagedVolumeWidth = columns * spacing_mm
    ds.ImagedVolumeHeight = rows * spacing_mm
    ds.ImagedVolumeDepth = SECTION_THICKNESS_UM
    ds.TotalPixelMatrixColumns = columns
    ds.TotalPixelMatrixRows = rows
    ds.TotalPixelMatrixFocalPlanes = 1
    # Origin at the slide corner; rows run along +X and columns along +Y of the slide
    # (wsidicom's rotation 0), so the image lies on the slide for any size.
    ds.TotalPixelMatrixOriginSequence = [
        _item(XOffsetInSlideCoordinateSystem="0", YOffsetInSlideCoordinateSystem="0")]
    ds.ImageOrientationSlide = ["0", "1", "0", "1", "0", "0"]
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = [_item(
        OpticalPathIdentifier="1",
        OpticalPathDescription="Brightfield, full spectrum",
        IlluminationTypeCodeSequence=[_code("111744", "DCM", "Brightfield illumination")],
        IlluminationColorCodeSequence=[_code("414298005", "SCT", "Full Spectrum")],
        ICCProfile=icc_profile,
        ColorSpace="SRGB",
    )]
    ds.AcquisitionContextSequence = []
    ds.ContainerIdentifier = identity.container_identifier
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    ds.SpecimenDescriptionSequence = [_item(
        SpecimenIdentifier=identity.container_identifier,
        SpecimenUID=uids.specimen_uid,
        IssuerOfTheSpecimenIdentifierSequence=[],
        # Viewers and wsidicom report the stain from this step; the phantom is H&E.
        SpecimenPreparationSequence=[hd.SpecimenPreparationStep(
            specimen_id=identity.container_identifier,
            processing_procedure=hd.SpecimenStaining(
                substances=[codes.SCT.HematoxylinStain, codes.SCT.WaterSolubleEosinStain]),
        )],
    )]
    ds.PyramidUID = uids.pyramid_uid
    ds.SharedFunctionalGroupsSequence = [_item(
        PixelMeasuresSequence=[_item(
            PixelSpacing=[_ds(spacing_mm), _ds(spacing_mm)],
            SliceThickness=_ds(SECTION_THICKNESS_UM / 1000.0),
        )],
        WholeSlideMicroscopyImageFrameTypeSequence=[_item(FrameType=image_type)],
        OpticalPathIdentificationSequence=[_item(OpticalPathIdentifier="1")],
    )]
    ds.PixelData = encapsulate(tiles)
    return ds
