"""Tile encoders: the WSI "deep feature" extractor, built from a registry declared as data.

The MRRP paper encodes each 224 × 224 H&E tile at 0.5 µm/px with UNI (a ViT-L/16 pathology
foundation model, 1024-d). Here every encoder is an entry of ``mrrp_pacs/data/tile_encoders.toml``
(or an operator's file of the same form) naming a backend, an architecture and its keyword
arguments, the output dimension, the input tile (pixels and µm/px) and the normalisation.
:func:`build_encoder` turns an entry into a :class:`TileEncoder`; its ``name`` and ``version``
enter the feature cache key, so ``version`` changes whenever the outputs would.

Two backends:

``hed-texture`` (the embedded default)
    A hand-crafted colour and texture descriptor in normalised hematoxylin, eosin and residual
    stain concentration (:mod:`mrrp_pacs.features.stain`: glass and dye vectors estimated once
    over all the tiles of one ``encode`` call, i.e. per slide),
    :data:`HED_TEXTURE_DIM` = 79 float32 values per tile, listed one by one in
    :data:`HED_TEXTURE_FEATURES`. Why it is the default: it needs no weights (nothing to
    license, download or keep on disk); it runs at about 150 tiles per second of one CPU core
    (numpy/scipy, one thread, leaving the other core of a 2-core box to slide reading;
    ``benchmarks/bench_tile_encoders.py``); every value has a unit and a meaning a
    pathologist can check; and it measures what the phantom hospital plants in its slides:
    nuclear size and its spread, nuclear density, dark lymphocyte-like nuclei, staining. Its
    limits against a foundation model: it sees intensities, blob scales and local texture, not
    tissue architecture (gland formation, invasion pattern, mitoses, necrosis); the stain
    normalisation removes a laboratory's dye hue and glass tint but not its dye intensity
    (a paler batch reads lower concentrations); and it has not been validated on real slides. Use
    ``uni`` wherever its weights can be had.

``timm``
    ``timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)`` with the
    weights read from a LOCAL checkpoint file given by the operator (``.safetensors``, or a
    torch state dict ``.bin``/``.pth``/``.pt``/``.torch`` loaded with ``weights_only=True``),
    keys checked strictly. The model is built on torch's meta device and the checkpoint's
    tensors are assigned to it, so no random initialisation runs and the weights are held in
    memory once (UNI: 1.2 GB, not 2.4). Nothing is ever downloaded: an entry whose checkpoint is not
    configured or not on disk is refused with a :class:`FeatureError` that names the encoder,
    the path and where the weights come from. Optional bfloat16 autocast on CPU. The encoder
    never changes torch's thread count: the process sets it once (``torch.set_num_threads``)
    for everything it runs, so encoders beside each other do not oversubscribe the cores.

Encoders take tiles as ``(n, tile_px, tile_px, 3)`` uint8 RGB at (close to) the entry's
``mpp`` and return ``(n, dim)`` float32.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from scipy import fft, ndimage

from mrrp_pacs.config import read_data_toml
from mrrp_pacs.errors import ConfigError, FeatureError
from mrrp_pacs.features.stain import STAIN_VERSION, StainEstimate, estimate_stain
from mrrp_pacs.store import sha256_file

if TYPE_CHECKING:
    import torch

LOGGER = logging.getLogger(__name__)

BACKENDS = ("hed-texture", "timm")
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".torch")
# Tiles reach a timm encoder resampled to its µm/px; the tolerance absorbs rounding of scanner
# resolutions, while farther off a foundation model would see nuclei at another apparent size
# than it was trained on.
TIMM_MPP_TOLERANCE = 0.1
DEFAULT_BATCH = 16

# -- the hed-texture descriptor ------------------------------------------------------------

HED_TEXTURE_VERSION = "2"  # 2: normalised stain concentrations instead of rgb2hed
HIST_BINS_PER_OD = 80  # fine histogram: 0.0125 OD bins, used for percentiles and fractions
HIST_BINS = 320  # fine histogram covers [0, 4) OD; higher values fall in the last bin
PERCENTILES = (10, 25, 50, 75, 90, 99)
H_THRESHOLDS_OD = (0.3, 0.5, 0.7, 0.9, 1.1, 1.3)
H_HIST_EDGES_OD = tuple(round(0.2 * k, 1) for k in range(13))  # 12 bins, last one open
TISSUE_OD = 0.15  # H + E above this is tissue, below it glass
NUCLEUS_OD = 0.5  # hematoxylin above this is nuclear
DARK_NUCLEUS_OD = 1.1  # mean hematoxylin of a lymphocyte-like (dark) nucleus
MIN_NUCLEUS_UM2 = 4.0  # smaller hematoxylin specks are not nuclei
BLOB_RADII_UM = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
GRADIENT_SIGMA_UM = 1.0
LBP_RADIUS_UM = 1.5
MIN_HED_MPP, MAX_HED_MPP = 0.2, 1.0  # a 3 µm nucleus must span a few pixels
CHUNK_TILES = 32  # bounds memory: concentrations of a chunk are 32 × 224² × 3 float32 (19 MB)


def _hed_feature_names() -> tuple[str, ...]:
    names: list[str] = []
    for stain in ("h", "e"):
        names += [f"{stain}_mean_od", f"{stain}_sd_od"]
        names += [f"{stain}_p{p}_od" for p in PERCENTILES]
    names += ["d_mean_od", "d_sd_od", "tissue_fraction"]
    names += [f"h_fraction_above_{t:.1f}_od" for t in H_THRESHOLDS_OD]
    names += [f"h_hist_{lo:.1f}_{hi:.1f}_od" for lo, hi in itertools.pairwise(H_HIST_EDGES_OD)]
    names += ["nuclei_per_mm2", "nucleus_area_mean_um2", "nucleus_area_sd_um2",
              "nucleus_area_p90_um2", "nucleus_elongation_mean", "nucleus_h_mean_od",
              "dark_nuclei_per_mm2", "dark_nucleus_area_mean_um2"]
    for radius in BLOB_RADII_UM:
        names += [f"blob_r{radius:.0f}um_nuclear_mean", f"blob_r{radius:.0f}um_rms",
                  f"blob_r{radius:.0f}um_best_share"]
    names += ["h_gradient_mean_od_per_um", "h_gradient_rms_od_per_um", "h_gradient_coherence",
              "e_gradient_mean_od_per_um", "e_gradient_rms_od_per_um", "e_gradient_coherence"]
    names += [f"h_lbp_{code}" for code in range(10)]
    return tuple(names)


HED_TEXTURE_FEATURES = _hed_feature_names()
"""Names of the hed-texture values, in order. Groups (OD = normalised stain concentration:
natural-log optical density along the dye's own unit vector, estimated per ``encode`` call by
:func:`mrrp_pacs.features.stain.estimate_stain`; all zero if no stain can be estimated, e.g.
blank glass):

- ``h_*``/``e_*`` mean, SD and percentiles 10–99 of hematoxylin / eosin OD over the tile
  (percentiles at 0.0125 OD resolution); ``d_*`` the residual (colour outside the estimated
  H&E plane: pen marks, pigment, DAB; signed); ``tissue_fraction``: share of pixels with
  H + E > 0.15 OD.
- ``h_fraction_above_*``: share of pixels whose hematoxylin exceeds 0.3 … 1.3 OD (nuclear
  area at increasing darkness); ``h_hist_*``: the hematoxylin histogram in 0.2 OD bins
  (shares; the last bin holds everything from 2.2 OD).
- nuclei: connected regions with H > 0.5 OD of at least 4 µm², 4-connected. Count per mm² of
  tile (all regions); area mean / SD / 90th percentile (µm²), mean elongation (major / minor
  axis from second moments) and mean hematoxylin over regions not cut by the tile border;
  ``dark_*``: the regions whose mean H is ≥ 1.1 OD (lymphocyte-like), per mm² and mean area.
  Touching nuclei merge into one region, so at high density areas grow and counts saturate.
- ``blob_r{3..8}um_*``: scale-normalised Laplacian of Gaussian of the hematoxylin map,
  −σ²∇²(G_σ ∗ H) with σ = r / √2 for nucleus radii r = 3 … 8 µm (the scale at which a disc
  of radius r answers most): mean and RMS of the response over the tile, and the share of
  nuclear pixels (H > 0.5 OD) whose strongest response is at that radius (a nuclear size
  distribution that survives touching nuclei).
- gradients of H and E after a Gaussian of σ = 1 µm: mean and RMS magnitude (OD/µm), and
  coherence |Σ(g_x + i g_y)²| / Σ|g|² in [0, 1] (1: all edges share one orientation, as
  along stromal fibres; 0: isotropic, as in a sheet of round nuclei).
- ``h_lbp_*``: shares of the rotation-invariant uniform local binary patterns of the
  hematoxylin map, codes as ``skimage.feature.local_binary_pattern(h, 8, 1.5 µm, "uniform")``
  (0–8: number of ring neighbours at least as dark as the centre on a uniform ring; 9: every
  non-uniform pattern), over the pixels whose ring lies inside the tile: chromatin texture.
"""
HED_TEXTURE_DIM = len(HED_TEXTURE_FEATURES)


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry.

    ``mean``/``std`` normalise RGB scaled to [0, 1] (timm only); ``weights`` says where the
    operator gets the checkpoint (timm only; this code never fetches it); ``kwargs`` go to
    ``timm.create_model``.
    """

    name: str
    backend: str
    dim: int
    tile_px: int
    mpp: float
    description: str
    architecture: str | None = None
    kwargs: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    weights: str | None = None

    def digest(self) -> str:
        """SHA-256 of everything in the entry that changes the encoder's outputs."""
        payload = json.dumps([self.backend, self.architecture, dict(self.kwargs), self.dim,
                              self.tile_px, self.mpp, self.mean, self.std], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


class TileEncoder(Protocol):
    """Turns H&E tiles into feature vectors; ``name`` + ``version`` identify its outputs."""

    name: str
    version: str
    dim: int
    tile_px: int

    def encode(self, tiles: np.ndarray, mpp: float) -> np.ndarray:
        """``(n, tile_px, tile_px, 3)`` uint8 RGB at ``mpp`` µm/px → ``(n, dim)`` float32."""
        ...


# -- registry ------------------------------------------------------------------------------

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_KEYS = {"backend", "description", "dim", "tile_px", "mpp", "architecture", "kwargs", "mean",
         "std", "weights"}
_TIMM_ONLY = ("architecture", "kwargs", "mean", "std", "weights")
_RESERVED_KWARGS = {"pretrained", "num_classes", "checkpoint_path", "pretrained_cfg",
                    "pretrained_cfg_overlay"}


def load_registry(path: Path | None = None) -> dict[str, EncoderSpec]:
    """Read an encoder registry (default: the built-in ``mrrp_pacs/data/tile_encoders.toml``).

    Every entry is validated eagerly; the built-in file documents the format.

    Raises
    ------
    FeatureError
        The file is unreadable, not TOML, or an entry is malformed; the message names the
        file, the entry and the key.
    """
    try:
        raw, source = read_data_toml(path, "tile_encoders.toml", "tile encoder registry")
    except ConfigError as exc:
        raise FeatureError(str(exc)) from None
    unknown_top = set(raw) - {"encoders"}
    if unknown_top:
        raise FeatureError(f"{source}: unknown tables {sorted(unknown_top)}; entries go under "
                           "[encoders.<name>]")
    entries = raw.get("encoders", {})
    if not entries:
        raise FeatureError(f"{source} defines no [encoders.<name>] entry")
    return {name: _parse_entry(name, entry, f"{source}: encoders.{name}")
            for name, entry in entries.items()}


def _parse_entry(name: str, entry: Any, where: str) -> EncoderSpec:
    if not isinstance(entry, dict):
        raise FeatureError(f"{where} is not a table")
    if not _NAME.fullmatch(name):
        raise FeatureError(f"{where}: the name must be lower-case letters, digits, '.', '_' or "
                           "'-' (it enters the feature cache key)")
    unknown = set(entry) - _KEYS
    if unknown:
        raise FeatureError(f"{where}: unknown keys {sorted(unknown)}")
    backend = entry.get("backend")
    if backend not in BACKENDS:
        raise FeatureError(f"{where}.backend = {backend!r}: expected one of {list(BACKENDS)}")
    dim = _positive_int(entry, "dim", where)
    tile_px = _positive_int(entry, "tile_px", where)
    mpp = entry.get("mpp")
    if isinstance(mpp, bool) or not isinstance(mpp, int | float) or not 0 < mpp < 100:
        raise FeatureError(f"{where}.mpp = {mpp!r}: expected the tiles' resolution in µm/px")
    mpp = float(mpp)
    description = entry.get("description")
    if not isinstance(description, str) or not description.strip():
        raise FeatureError(f"{where}.description: a sentence saying what the encoder is")
    if backend == "hed-texture":
        extra = [key for key in _TIMM_ONLY if key in entry]
        if extra:
            raise FeatureError(f"{where}: {extra} apply to timm encoders only")
        if dim != HED_TEXTURE_DIM:
            raise FeatureError(f"{where}.dim = {dim}: hed-texture gives {HED_TEXTURE_DIM} values")
        return EncoderSpec(name, backend, dim, tile_px, mpp, description)
    architecture = entry.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise FeatureError(f"{where}.architecture: the timm model name, e.g. "
                           "'vit_large_patch16_224'")
    kwargs = entry.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(
            isinstance(v, bool | int | float | str) for v in kwargs.values()):
        raise FeatureError(f"{where}.kwargs must be a table of numbers, booleans and strings")
    reserved = sorted(set(kwargs) & _RESERVED_KWARGS)
    if reserved:
        raise FeatureError(f"{where}.kwargs: {reserved} are set by this code (no pretrained "
                           "download, no classifier head); remove them")
    mean, std = _triple(entry, "mean", where), _triple(entry, "std", where)
    if min(std) <= 0:
        raise FeatureError(f"{where}.std = {list(std)}: must be positive")
    weights = entry.get("weights")
    if not isinstance(weights, str) or not weights.strip():
        raise FeatureError(f"{where}.weights: say which checkpoint file the operator must "
                           "provide and where it is published")
    return EncoderSpec(name, backend, dim, tile_px, mpp, description, architecture,
                       MappingProxyType(dict(kwargs)), mean, std, weights)


def _positive_int(entry: dict[str, Any], key: str, where: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FeatureError(f"{where}.{key} = {value!r}: expected a positive integer")
    return value


def _triple(entry: dict[str, Any], key: str, where: str) -> tuple[float, float, float]:
    value = entry.get(key)
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        raise FeatureError(f"{where}.{key} = {value!r}: expected three numbers (R, G, B of "
                           "images scaled to [0, 1])")
    return (float(value[0]), float(value[1]), float(value[2]))


# -- building ------------------------------------------------------------------------------


def build_encoder(name: str, checkpoints: Mapping[str, Path | str] | None = None,
                  bf16: bool = False, *, registry: Mapping[str, EncoderSpec] | None = None,
                  batch_size: int = DEFAULT_BATCH) -> TileEncoder:
    """Build the encoder ``name`` of ``registry`` (default: :func:`load_registry`).

    Parameters
    ----------
    name
        Registry entry, e.g. ``"hed-texture"`` or ``"uni"``.
    checkpoints
        Encoder name → local checkpoint file, from the operator's configuration; only the
        entry for ``name`` is read, and only timm encoders need one.
    bf16
        Run timm encoders under bfloat16 autocast on CPU (2.4–3.4× faster on this project's
        AVX-512 BF16 CPUs; outputs within cosine 0.99 of float32). Part of ``version``.
    batch_size
        Tiles per forward pass of a timm encoder.

    Raises
    ------
    FeatureError
        Unknown encoder; a timm checkpoint not configured, missing, unreadable or not
        matching the architecture. The message names the encoder and the path.
    """
    specs = load_registry() if registry is None else registry
    spec = specs.get(name)
    if spec is None:
        raise FeatureError(f"unknown tile encoder {name!r}: the registry has {sorted(specs)}")
    configured = (checkpoints or {}).get(name)
    if spec.backend == "hed-texture":
        if configured is not None:
            raise FeatureError(f"tile encoder {name!r} has no weights, yet a checkpoint is "
                               f"configured for it ({configured}); remove that setting")
        return HedTextureEncoder(spec)
    if configured is None:
        raise FeatureError(
            f"tile encoder {name!r} needs its weights and no checkpoint path is configured for "
            f"it: put the file ({spec.weights}) on this machine and give its local path as the "
            f"{name!r} encoder checkpoint in the configuration; nothing is downloaded")
    path = Path(configured).expanduser()
    state = _read_checkpoint(name, path, spec)
    model = create_timm_model(spec, device="meta")
    _assign_weights(name, path, model, state)
    digest = _sha256_of(path)
    version = f"sha256:{digest[:16]}+spec:{spec.digest()[:8]}"
    import torch

    LOGGER.info("tile encoder %s: %s from %s (sha256 %s), %d torch threads%s", name,
                spec.architecture, path, digest[:16], torch.get_num_threads(),
                ", bfloat16" if bf16 else "")
    return TimmEncoder(spec, model, version, bf16=bf16, batch_size=batch_size)


def create_timm_model(spec: EncoderSpec, *, device: str = "cpu") -> torch.nn.Module:
    """``timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)``, in eval.

    On ``device="cpu"`` the weights are timm's random initialisation (seed with
    ``torch.manual_seed``); on ``"meta"`` no memory is allocated and no initialisation runs,
    which is how :func:`build_encoder` builds a model whose weights a checkpoint replaces.

    Raises
    ------
    FeatureError
        ``spec`` is not a timm entry, timm does not know the architecture or its kwargs, or
        the model's feature dimension is not ``spec.dim``.
    """
    if spec.backend != "timm" or spec.architecture is None:
        raise FeatureError(f"tile encoder {spec.name!r} is not a timm encoder")
    import timm
    import torch

    if not timm.is_model(spec.architecture):
        raise FeatureError(f"tile encoder {spec.name!r}: timm {timm.__version__} has no "
                           f"architecture {spec.architecture!r}")
    kwargs: dict[str, Any] = dict(spec.kwargs)
    try:
        with torch.device(device):
            model = timm.create_model(spec.architecture, pretrained=False, num_classes=0,
                                      **kwargs)
    except Exception as exc:  # timm raises TypeError for an unknown kwarg, others for values
        raise FeatureError(f"tile encoder {spec.name!r}: {spec.architecture} cannot be built "
                           f"with kwargs {dict(spec.kwargs)}: {type(exc).__name__}: {exc}"
                           ) from exc
    if model.num_features != spec.dim:
        raise FeatureError(f"tile encoder {spec.name!r}: {spec.architecture} gives "
                           f"{model.num_features} features, the registry says dim = {spec.dim}")
    return model.eval().requires_grad_(False)


def _read_checkpoint(name: str, path: Path, spec: EncoderSpec) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise FeatureError(f"tile encoder {name!r}: checkpoint path {path} is a folder; give "
                           f"the weights file itself ({spec.weights})")
    if not path.is_file():
        raise FeatureError(f"tile encoder {name!r}: checkpoint {path} does not exist; put the "
                           f"weights file there ({spec.weights}) or correct the configured path")
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(path)
        elif suffix in TORCH_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise FeatureError(f"tile encoder {name!r}: checkpoint {path} is neither "
                               f".safetensors nor a torch state dict ({', '.join(TORCH_SUFFIXES)})")
    except FeatureError:
        raise
    except Exception as exc:  # safetensors, pickle and zipfile raise many types
        raise FeatureError(f"tile encoder {name!r}: checkpoint {path} cannot be read: "
                           f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state)[:8] if isinstance(state, dict) else []
        raise FeatureError(f"tile encoder {name!r}: checkpoint {path} is not a plain state dict "
                           f"of tensors (top-level keys {keys}); save model.state_dict() alone")
    return state


def _assign_weights(name: str, path: Path, model: torch.nn.Module,
                    state: dict[str, torch.Tensor]) -> None:
    import torch

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k} {tuple(state[k].shape)} ≠ {tuple(expected[k].shape)}"
                   for k in sorted(set(expected) & set(state))
                   if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("of another shape", wrong_shape)):
            if items:
                problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:4])})")
        raise FeatureError(
            f"tile encoder {name!r}: checkpoint {path} does not fit "
            f"{model.__class__.__name__} as the registry builds it: keys " + "; ".join(problems)
            + ". Is it the file the registry names, saved without a classifier head or a "
            "wrapper prefix such as 'module.'?")
    model.load_state_dict(state, strict=True, assign=True)
    model.float()  # a half-precision checkpoint assigned as is would run in half precision
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.device == torch.device("meta")]
    if left_on_meta:
        raise FeatureError(f"tile encoder {name!r}: {model.__class__.__name__} keeps state "
                           f"outside its state dict ({left_on_meta[:4]}); this architecture "
                           "cannot be loaded by assignment")


def _sha256_of(path: Path) -> str:
    return sha256_file(path)[0]


# -- encoders ------------------------------------------------------------------------------


def _check_tiles(name: str, tiles: np.ndarray, tile_px: int) -> None:
    if not isinstance(tiles, np.ndarray) or tiles.dtype != np.uint8 or tiles.ndim != 4 or \
            tiles.shape[1:] != (tile_px, tile_px, 3):
        shape = getattr(tiles, "shape", None)
        dtype = getattr(tiles, "dtype", type(tiles).__name__)
        raise FeatureError(f"tile encoder {name!r} takes (n, {tile_px}, {tile_px}, 3) uint8 RGB "
                           f"tiles, got shape {shape} of {dtype}")


class TimmEncoder:
    """A timm model behind the :class:`TileEncoder` interface.

    Parameters
    ----------
    spec
        Its registry entry (architecture, normalisation, tile size, µm/px).
    model
        The model, as :func:`create_timm_model` builds it, with its weights in place.
    version
        Identifies the weights (``build_encoder`` puts the checkpoint's SHA-256 prefix in it);
        ``"+bf16"`` is appended under bfloat16.
    bf16
        Forward passes under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
    batch_size
        Tiles per forward pass.
    """

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, version: str, *,
                 bf16: bool = False, batch_size: int = DEFAULT_BATCH) -> None:
        import torch

        if spec.mean is None or spec.std is None:
            raise FeatureError(f"tile encoder {spec.name!r} has no normalisation")
        if batch_size < 1:
            raise FeatureError(f"tile encoder {spec.name!r}: batch_size {batch_size} < 1")
        self.spec = spec
        self.name = spec.name
        self.version = version + ("+bf16" if bf16 else "")
        self.dim = spec.dim
        self.tile_px = spec.tile_px
        self.bf16 = bf16
        self.batch_size = batch_size
        self.model = model.eval().requires_grad_(False)
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)

    def encode(self, tiles: np.ndarray, mpp: float) -> np.ndarray:
        """Encode tiles.

        Parameters
        ----------
        tiles
            ``(n, tile_px, tile_px, 3)`` uint8 RGB.
        mpp
            Their resolution, µm/px; must be within 10 % of the entry's.

        Returns
        -------
        np.ndarray
            ``(n, dim)`` float32: the model's pooled embedding (``num_classes=0``).
        """
        import torch

        _check_tiles(self.name, tiles, self.tile_px)
        if not abs(mpp / self.spec.mpp - 1.0) <= TIMM_MPP_TOLERANCE:
            raise FeatureError(f"tile encoder {self.name!r} expects tiles at "
                               f"{self.spec.mpp} µm/px (±10 %), got {mpp} µm/px; resample the "
                               "slide to the encoder's resolution")
        out = np.empty((len(tiles), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(tiles), self.batch_size):
                # a copy: tiles may be a read-only view (np.asarray of an image)
                batch = torch.tensor(tiles[start : start + self.batch_size])
                x = (batch.permute(0, 3, 1, 2).float().div_(255.0) - self._mean) / self._std
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    y = self.model(x)
                out[start : start + len(batch)] = y.float().numpy()
        return out


class HedTextureEncoder:
    """The embedded default: :data:`HED_TEXTURE_FEATURES` per tile (see the module docstring).

    Deterministic and weight-free; ``version`` is the descriptor's code version.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = f"hed-texture-{HED_TEXTURE_VERSION}-stain{STAIN_VERSION}"
        self.dim = HED_TEXTURE_DIM
        self.tile_px = spec.tile_px

    def encode(self, tiles: np.ndarray, mpp: float) -> np.ndarray:
        """Describe tiles.

        Parameters
        ----------
        tiles
            ``(n, tile_px, tile_px, 3)`` uint8 RGB, H&E.
        mpp
            Their resolution, µm/px, 0.2–1.0: sizes are in µm, so any resolution in that
            range measures the same nuclei.

        Returns
        -------
        np.ndarray
            ``(n, 79)`` float32, in the order of :data:`HED_TEXTURE_FEATURES`.
        """
        _check_tiles(self.name, tiles, self.tile_px)
        if not MIN_HED_MPP <= mpp <= MAX_HED_MPP:
            raise FeatureError(f"tile encoder {self.name!r} works at {MIN_HED_MPP}–"
                               f"{MAX_HED_MPP} µm/px, got {mpp}: nuclei must span a few pixels")
        if len(tiles) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        stain = estimate_stain(tiles)  # one estimate for the call: the slide's tiles together
        return np.concatenate([_hed_texture(tiles[start : start + CHUNK_TILES], mpp, stain)
                               for start in range(0, len(tiles), CHUNK_TILES)])


def _hed_texture(tiles: np.ndarray, mpp: float, stain: StainEstimate | None) -> np.ndarray:
    """The hed-texture descriptor of a batch of tiles, unchecked.

    Parameters
    ----------
    tiles
        ``(n, h, w, 3)`` uint8 RGB H&E, n ≥ 1.
    mpp
        µm/px.
    stain
        The stain estimate of the tiles' slide; None (nothing stained) gives zero
        concentrations.

    Returns
    -------
    np.ndarray
        ``(n, HED_TEXTURE_DIM)`` float32.
    """
    hed = (stain.concentrations(tiles) if stain is not None
           else np.zeros(tiles.shape, np.float32))
    h, e, d = hed[..., 0], hed[..., 1], hed[..., 2]
    n = len(tiles)
    parts = [_stain_statistics(h, e, d), _nuclear_objects(h, mpp),
             _blob_scale_space(h, mpp), _gradients(h, mpp), _gradients(e, mpp),
             _lbp_riu2(h, mpp)]
    return np.concatenate([p.reshape(n, -1) for p in parts], axis=1).astype(np.float32)


def _fine_histogram(values: np.ndarray) -> np.ndarray:
    """Per-tile histogram of OD values in 0.0125 OD bins over [0, 4): (n, HIST_BINS) shares."""
    n = len(values)
    bins = np.minimum((values * HIST_BINS_PER_OD).astype(np.int32), HIST_BINS - 1)
    bins += (np.arange(n, dtype=np.int32) * HIST_BINS)[:, None, None]
    counts = np.bincount(bins.ravel(), minlength=n * HIST_BINS).reshape(n, HIST_BINS)
    return counts / values[0].size


def _stain_statistics(h: np.ndarray, e: np.ndarray, d: np.ndarray) -> np.ndarray:
    n = len(h)
    histograms = {"h": _fine_histogram(h), "e": _fine_histogram(e)}
    columns: list[np.ndarray] = []
    for stain, histogram in ((h, histograms["h"]), (e, histograms["e"])):
        flat = stain.reshape(n, -1)
        cdf = np.cumsum(histogram, axis=1)
        # the first bin whose cumulative share reaches p, at its centre
        quantiles = [(np.argmax(cdf >= p / 100 - 1e-9, axis=1) + 0.5) / HIST_BINS_PER_OD
                     for p in PERCENTILES]
        columns += [flat.mean(axis=1), flat.std(axis=1), *quantiles]
    flat_d = d.reshape(n, -1)
    tissue = ((h + e) > TISSUE_OD).reshape(n, -1).mean(axis=1)
    columns += [flat_d.mean(axis=1), flat_d.std(axis=1), tissue]
    h_cdf = np.cumsum(histograms["h"], axis=1)
    columns += [1.0 - h_cdf[:, round(t * HIST_BINS_PER_OD) - 1] for t in H_THRESHOLDS_OD]
    starts = [round(lo * HIST_BINS_PER_OD) for lo in H_HIST_EDGES_OD[:-1]]
    ends = [*starts[1:], HIST_BINS]  # the last coarse bin is open above
    columns += [histograms["h"][:, lo:hi].sum(axis=1) for lo, hi in zip(starts, ends, strict=True)]
    return np.stack(columns, axis=1)


_FOUR_CONNECTED_2D = np.array([np.zeros((3, 3)), [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                               np.zeros((3, 3))], dtype=bool)


def _nuclear_objects(h: np.ndarray, mpp: float) -> np.ndarray:
    n, rows, cols = h.shape
    labels, count = ndimage.label(h > NUCLEUS_OD, structure=_FOUR_CONNECTED_2D)
    out = np.zeros((n, 8))
    if count == 0:
        return out
    flat = labels.ravel()
    on = flat > 0
    ids = flat[on]
    # labels are numbered in raster order over the batch, so each tile owns a contiguous range
    last_label = np.maximum.accumulate(labels.reshape(n, -1).max(axis=1))
    tile_of = np.searchsorted(last_label, np.arange(1, count + 1), side="left")
    pixel_index = np.flatnonzero(on)
    r = ((pixel_index // cols) % rows).astype(np.float64)
    c = (pixel_index % cols).astype(np.float64)
    size = count + 1
    area_px = np.bincount(ids, minlength=size)[1:].astype(np.float64)
    h_sum = np.bincount(ids, weights=h.ravel()[on], minlength=size)[1:]
    sr = np.bincount(ids, weights=r, minlength=size)[1:]
    sc = np.bincount(ids, weights=c, minlength=size)[1:]
    srr = np.bincount(ids, weights=r * r, minlength=size)[1:]
    scc = np.bincount(ids, weights=c * c, minlength=size)[1:]
    src = np.bincount(ids, weights=r * c, minlength=size)[1:]
    border = np.zeros(size, dtype=bool)
    border[labels[:, [0, -1], :]] = True
    border[labels[:, :, [0, -1]]] = True
    border = border[1:]

    area_um2 = area_px * mpp * mpp
    real = area_um2 >= MIN_NUCLEUS_UM2
    var_r = srr / area_px - (sr / area_px) ** 2
    var_c = scc / area_px - (sc / area_px) ** 2
    cov = src / area_px - (sr / area_px) * (sc / area_px)
    spread = np.sqrt(((var_r - var_c) / 2) ** 2 + cov**2)
    major = (var_r + var_c) / 2 + spread
    minor = np.maximum((var_r + var_c) / 2 - spread, 1.0 / 12)  # a pixel's own variance
    elongation = np.sqrt(major / minor)
    mean_h = h_sum / area_px
    tile_mm2 = rows * cols * mpp * mpp / 1e6

    for tile in range(n):
        mine = real & (tile_of == tile)
        whole = mine & ~border
        dark = mine & (mean_h >= DARK_NUCLEUS_OD)
        out[tile, 0] = mine.sum() / tile_mm2
        if whole.any():
            areas = area_um2[whole]
            out[tile, 1:6] = (areas.mean(), areas.std(), np.percentile(areas, 90),
                              elongation[whole].mean(), mean_h[whole].mean())
        out[tile, 6] = dark.sum() / tile_mm2
        if dark.any():
            out[tile, 7] = area_um2[dark].mean()
    return out


def _blob_scale_space(h: np.ndarray, mpp: float) -> np.ndarray:
    n, rows, cols = h.shape
    sigmas = [r / math.sqrt(2) / mpp for r in BLOB_RADII_UM]
    # Every response is band-limited by its Gaussian, so it is computed on a grid `step` times
    # coarser (exactly, up to < 1e-6 of aliasing): the largest power of two keeping
    # exp(−2π²σ²f²) < 1e-6 at the coarse grid's Nyquist frequency 0.5 / step.
    step = 1 << max(0, int(math.log2(sigmas[0] * math.pi * math.sqrt(2) / 2
                                     / math.sqrt(math.log(1e6)))))
    pad = math.ceil(3 * sigmas[-1])
    shape = [fft.next_fast_len(math.ceil((size + 2 * pad) / (2 * step)), real=True) * 2 * step
             for size in (rows, cols)]
    top, left = (shape[0] - rows) // 2, (shape[1] - cols) // 2
    padded = np.pad(h, ((0, 0), (top, shape[0] - rows - top), (left, shape[1] - cols - left)),
                    mode="reflect")
    spectrum = fft.rfft2(padded)
    coarse = (shape[0] // step, shape[1] // step)
    half_rows = coarse[0] // 2
    spectrum = np.concatenate([spectrum[:, :half_rows, : coarse[1] // 2 + 1],
                               spectrum[:, shape[0] - half_rows :, : coarse[1] // 2 + 1]], axis=1)
    spectrum /= step * step  # irfft2 normalises by the coarse grid's size
    fy = fft.fftfreq(coarse[0]).astype(np.float32)[:, None] / step  # cycles per fine pixel
    fx = fft.rfftfreq(coarse[1]).astype(np.float32)[None, :] / step
    f2 = fy * fy + fx * fx
    window = (slice(None), slice(math.ceil(top / step), math.ceil((top + rows) / step)),
              slice(math.ceil(left / step), math.ceil((left + cols) / step)))
    responses = []
    for sigma in sigmas:
        # −σ²∇²G_σ in frequency: σ² · 4π²|f|² · exp(−2π²σ²|f|²); positive on bright-in-H blobs
        transfer = (4 * math.pi**2 * sigma**2) * f2 * np.exp(-2 * math.pi**2 * sigma**2 * f2)
        responses.append(fft.irfft2(spectrum * transfer, s=coarse)[window])
    flat = np.stack(responses).reshape(len(sigmas), n, -1)
    on_grid = h[:, window[1].start * step - top :: step, window[2].start * step - left :: step]
    nuclear = (on_grid[:, : responses[0].shape[1], : responses[0].shape[2]] > NUCLEUS_OD
               ).reshape(n, -1)
    counts = np.maximum(nuclear.sum(axis=1), 1)
    nuclear_mean = (flat * nuclear).sum(axis=2) / counts
    rms = np.sqrt((flat * flat).mean(axis=2))
    best = flat.argmax(axis=0)
    share = np.stack([((best == k) & nuclear).sum(axis=1) / counts for k in range(len(sigmas))])
    return np.stack([nuclear_mean, rms, share], axis=2).transpose(1, 0, 2)  # (n, scale, statistic)


def _gradients(stain: np.ndarray, mpp: float) -> np.ndarray:
    n = len(stain)
    sigma = GRADIENT_SIGMA_UM / mpp
    smooth = ndimage.gaussian_filter(stain, (0, sigma, sigma), mode="reflect")
    gy, gx = np.gradient(smooth, mpp, axis=(1, 2))
    magnitude2 = (gx * gx + gy * gy).reshape(n, -1)
    energy = magnitude2.sum(axis=1)
    doubled = (gx * gx - gy * gy).reshape(n, -1).sum(axis=1) + \
        2j * (gx * gy).reshape(n, -1).sum(axis=1)
    coherence = np.abs(doubled) / np.maximum(energy, 1e-12)
    return np.stack([np.sqrt(magnitude2).mean(axis=1), np.sqrt(magnitude2.mean(axis=1)),
                     coherence], axis=1)


def _riu2_table(neighbours: int = 8) -> np.ndarray:
    """Code → rotation-invariant uniform class: the number of set bits when the circular
    pattern has at most two 0/1 transitions, else ``neighbours + 1``."""
    table = np.empty(1 << neighbours, dtype=np.intp)
    for code in range(1 << neighbours):
        bits = [(code >> k) & 1 for k in range(neighbours)]
        transitions = sum(bits[k] != bits[(k + 1) % neighbours] for k in range(neighbours))
        table[code] = sum(bits) if transitions <= 2 else neighbours + 1
    return table


_RIU2 = _riu2_table()


def _lbp_riu2(h: np.ndarray, mpp: float) -> np.ndarray:
    """Shares of the 10 riu2 classes over the pixels whose ring lies inside the tile; the
    codes are those of ``skimage.feature.local_binary_pattern(h, 8, R, "uniform")`` (same
    ring rounded to 5 decimals, bilinear interpolation in the same order, ``>=``)."""
    n, rows, cols = h.shape
    radius = LBP_RADIUS_UM / mpp
    reach = math.ceil(radius)
    ring = []
    for k in range(8):
        angle = 2 * math.pi * k / 8
        dr, dc = round(-radius * math.sin(angle), 5), round(radius * math.cos(angle), 5)
        ring.append((dr - math.floor(dr), dc - math.floor(dc), math.floor(dr), math.floor(dc),
                     math.ceil(dr), math.ceil(dc)))
    # one tile at a time into preallocated buffers: the float64 arrays stay in cache
    inner = (rows - 2 * reach, cols - 2 * reach)
    code = np.empty(inner, dtype=np.uint8)
    top, bottom, term = np.empty(inner), np.empty(inner), np.empty(inner)
    darker = np.empty(inner, dtype=bool)
    counts = np.empty((n, 10))
    for tile in range(n):
        # float64 as skimage: in float32, interpolating equal values can land an ulp below
        # them and flip bits in flat regions
        image = h[tile].astype(np.float64)

        def shifted(dr: int, dc: int, image: np.ndarray = image) -> np.ndarray:
            return image[reach + dr : rows - reach + dr, reach + dc : cols - reach + dc]

        centre = shifted(0, 0)
        code[:] = 0
        for k, (fr, fc, r0, c0, r1, c1) in enumerate(ring):
            if (r0, c0) == (r1, c1):
                neighbour = shifted(r0, c0)
            else:  # skimage's order: along columns, then rows
                np.multiply(shifted(r0, c0), 1 - fc, out=top)
                top += np.multiply(shifted(r0, c1), fc, out=term)
                np.multiply(shifted(r1, c0), 1 - fc, out=bottom)
                bottom += np.multiply(shifted(r1, c1), fc, out=term)
                top *= 1 - fr
                top += np.multiply(bottom, fr, out=term)
                neighbour = top
            np.greater_equal(neighbour, centre, out=darker)
            code |= darker.view(np.uint8) << k
        counts[tile] = np.bincount(_RIU2[code].ravel(), minlength=10)
    return counts / code.size
