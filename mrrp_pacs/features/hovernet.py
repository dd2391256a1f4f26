"""HoVer-Net as tiatoolbox defines it: architecture, output decoding and a nucleus segmenter.

The network (Graham et al., Medical Image Analysis 58, 2019) is written here in plain torch with
tiatoolbox's module and parameter names, so that the checkpoints tiatoolbox publishes
(``hovernet_fast-pannuke``, ``hovernet_original-kumar``, ...: a ``state_dict`` saved with
``torch.save``) load by path with ``load_state_dict(strict=True)``. tiatoolbox itself is not a
dependency (its torch pin conflicts with ours) and nothing is ever downloaded.

Two layouts, both with valid padding (the output is a centred crop of the input):

=========  ============  ==============  ===============================  ==============
mode       input (px)    output (px)     decoder kernel                   tiatoolbox use
=========  ============  ==============  ===============================  ==============
fast       256           164             3                                PanNuke, MoNuSAC
original   270           80              5                                Kumar, CoNSeP
=========  ============  ==============  ===============================  ==============

The mode and the number of nucleus types are read from the checkpoint's shapes. All published
HoVer-Net weights work at 0.25 µm/px; the input is RGB in [0, 255] (the network divides by 255).

Decoding follows tiatoolbox's ``HoVerNet._proc_np_hv`` / ``get_instance_info``: NP (softmax,
channel 1) ≥ 0.5 is nucleus (components under 10 px dropped); the horizontal and vertical maps
are min-max normalised, differentiated by a Sobel filter (21 px at 0.25 µm/px) and combined into
an energy map; markers are nucleus pixels away from the HV edges, opened by a 5 px ellipse;
a marker-controlled watershed on the blurred energy cuts the instances. Each instance takes the
majority type of the TP argmax over its pixels (the runner-up when the majority is background).
OpenCV is not used: its Sobel, Gaussian and ellipse kernels are rebuilt with scipy.

PanNuke types → sc-MTOP types (:data:`~mrrp_pacs.features.nuclei.NUCLEUS_TYPES`), as sc-MTOP
itself maps them (its graph keeps neoplastic→T, inflammatory→I, connective→S, non-neoplastic
epithelial→N and leaves the rest out): 1 neoplastic → tumour, 2 inflammatory → inflammatory,
3 connective → stromal, 5 non-neoplastic epithelial → normal; 4 dead (necrosis) and instances
typed background are dropped, since no sc-MTOP type or graph holds them. A checkpoint without a
TP head (e.g. Kumar) gets its instances typed by the measurement model the classical segmenter
uses (:class:`~mrrp_pacs.features.nuclei.NucleusTypeModel`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import watershed
from torch import nn
from torch.nn import functional

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.nuclei import (
    INFLAMMATORY,
    NORMAL,
    STROMAL,
    TUMOUR,
    SegmentedNuclei,
    check_tile,
    default_type_model,
    stain_density,
    typing_measurements,
)

LOGGER = logging.getLogger(__name__)

HOVERNET_VERSION = "1"  # decoding and tiling; the weights' digest is added per checkpoint

MODEL_MPP = 0.25  # µm/px of every published HoVer-Net checkpoint (tiatoolbox's ioconfig)


@dataclass(frozen=True)
class HoverNetLayout:
    """Input and output patch sizes (px) of one HoVer-Net mode and its decoder kernel."""

    mode: str
    input_px: int
    output_px: int
    decoder_ksize: int

    @property
    def margin_px(self) -> int:
        """Pixels the valid convolutions eat on each side of the input."""
        return (self.input_px - self.output_px) // 2


LAYOUTS = {
    "fast": HoverNetLayout("fast", 256, 164, 3),
    "original": HoverNetLayout("original", 270, 80, 5),
}

# PanNuke TP class id → sc-MTOP type index (None: dropped). Ids as in tiatoolbox's
# hovernet_fast-pannuke nuc_type_dict: 0 background, 1 neoplastic, 2 inflammatory,
# 3 connective, 4 dead, 5 non-neoplastic epithelial.
PANNUKE_TYPES = ("background", "neoplastic", "inflammatory", "connective", "dead",
                 "non-neoplastic epithelial")
PANNUKE_TO_SCMTOP: tuple[int | None, ...] = (None, TUMOUR, INFLAMMATORY, STROMAL, None, NORMAL)

# Decoding constants of tiatoolbox's _proc_np_hv at 0.25 µm/px (scale factor 1).
NP_THRESHOLD = 0.5
MIN_BLOB_PX = 10
SOBEL_PX = 21
ENERGY_EDGE = 0.4
MARKER_OPENING_PX = 5


# ---------------------------------------------------------------------------------------------
# architecture (module and parameter names are tiatoolbox's: they are the checkpoint's keys)


class _SamePad(nn.Module):
    """Zero padding as TensorFlow's ``same`` for a square kernel (no parameters)."""

    def __init__(self, ksize: int, stride: int) -> None:
        super().__init__()
        self.ksize, self.stride = ksize, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rest = x.shape[2] % self.stride
        total = max(self.ksize - (self.stride if rest == 0 else rest), 0)
        before = total // 2
        after = total - before
        return functional.pad(x, (before, after, before, after), "constant", 0.0)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1,
          bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=0, groups=groups, bias=bias)


def _centre_crop(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Remove ``rows`` and ``cols`` pixels, the smaller half at the top/left."""
    top, left = rows // 2, cols // 2
    return x[:, :, top : x.shape[2] - (rows - top), left : x.shape[3] - (cols - left)]


class _ResidualStage(nn.Module):
    """Pre-activation bottleneck units (1×1, 3×3 same-padded, 1×1) with a 1×1 shortcut."""

    def __init__(self, c_in: int, widths: tuple[int, int, int], count: int,
                 stride: int) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        unit_in = c_in
        for index in range(count):
            unit_stride = stride if index == 0 else 1
            layers: list[tuple[str, nn.Module]] = []
            if index > 0:  # the previous unit ends without activation: add it here
                layers += [("preact/bn", _bn(unit_in)), ("preact/relu", nn.ReLU(inplace=True))]
            layers += [
                ("conv1", _conv(unit_in, widths[0], 1)),
                ("conv1/bn", _bn(widths[0])),
                ("conv1/relu", nn.ReLU(inplace=True)),
                ("conv2/pad", _SamePad(3, unit_stride)),
                ("conv2", _conv(widths[0], widths[1], 3, stride=unit_stride)),
                ("conv2/bn", _bn(widths[1])),
                ("conv2/relu", nn.ReLU(inplace=True)),
                ("conv3", _conv(widths[1], widths[2], 1)),
            ]
            self.units.append(nn.Sequential(OrderedDict(layers)))
            unit_in = widths[2]
        self.shortcut = (_conv(c_in, widths[2], 1, stride=stride)
                         if c_in != widths[2] or stride != 1 else None)
        self.blk_bna = nn.Sequential(OrderedDict([("bn", _bn(unit_in)),
                                                  ("relu", nn.ReLU(inplace=True))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        for unit in self.units:
            x = unit(x) + skip
            skip = x
        out: torch.Tensor = self.blk_bna(x)
        return out


class _DenseStage(nn.Module):
    """Dense units (1×1, then grouped k×k valid) whose outputs join the cropped input."""

    def __init__(self, c_in: int, ksize: int, count: int) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        unit_in = c_in
        for _ in range(count):
            self.units.append(nn.Sequential(OrderedDict([
                ("preact_bna/bn", _bn(unit_in)),
                ("preact_bna/relu", nn.ReLU(inplace=True)),
                ("conv1", _conv(unit_in, 128, 1)),
                ("conv1/bn", _bn(128)),
                ("conv1/relu", nn.ReLU(inplace=True)),
                ("conv2", _conv(128, 32, ksize, groups=4)),
            ])))
            unit_in += 32
        self.blk_bna = nn.Sequential(OrderedDict([("bn", _bn(unit_in)),
                                                  ("relu", nn.ReLU(inplace=True))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            new = unit(x)
            x = _centre_crop(x, x.shape[2] - new.shape[2], x.shape[3] - new.shape[3])
            x = torch.cat([x, new], dim=1)
        out: torch.Tensor = self.blk_bna(x)
        return out


def _decoder_branch(out_ch: int, ksize: int) -> nn.Sequential:
    u3 = nn.Sequential(OrderedDict([("conva", _conv(1024, 256, ksize)),
                                    ("dense", _DenseStage(256, ksize, 8)),
                                    ("convf", _conv(512, 512, 1))]))
    u2 = nn.Sequential(OrderedDict([("conva", _conv(512, 128, ksize)),
                                    ("dense", _DenseStage(128, ksize, 4)),
                                    ("convf", _conv(256, 256, 1))]))
    u1 = nn.Sequential(OrderedDict([("conva/pad", _SamePad(ksize, 1)),
                                    ("conva", _conv(256, 64, ksize))]))
    u0 = nn.Sequential(OrderedDict([("bn", _bn(64)), ("relu", nn.ReLU(inplace=True)),
                                    ("conv", _conv(64, out_ch, 1, bias=True))]))
    return nn.Sequential(OrderedDict([("u3", u3), ("u2", u2), ("u1", u1), ("u0", u0)]))


class _Upsample2x(nn.Module):
    """Nearest-neighbour ×2 as a product with a 2×2 block of ones, kept as a buffer so that the
    checkpoint's ``upsample2x.unpool_mat`` has its place."""

    unpool_mat: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unpool_mat", torch.ones((2, 2), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        block = self.unpool_mat[None, None, None, :, None, :]
        return (x[:, :, :, None, :, None] * block).reshape(n, c, 2 * h, 2 * w)


class HoVerNet(nn.Module):
    """HoVer-Net with tiatoolbox's module names.

    ``forward`` maps (N, 3, H, W) RGB in [0, 255] (H = W = the layout's input) to a dict of
    logits: ``"tp"`` (N, num_types, ·, ·) when typed, ``"np"`` (N, 2, ·, ·) and ``"hv"``
    (N, 2, ·, ·), each the layout's output size.
    """

    def __init__(self, num_types: int | None, mode: str) -> None:
        super().__init__()
        if mode not in LAYOUTS:
            raise ValueError(f"HoVer-Net mode {mode!r}: 'fast' or 'original'")
        self.mode, self.num_types = mode, num_types
        stem: list[tuple[str, nn.Module]] = [("/", _conv(3, 64, 7)), ("bn", _bn(64)),
                                             ("relu", nn.ReLU(inplace=True))]
        if mode == "fast":
            stem.insert(0, ("pad", _SamePad(7, 1)))
        self.conv0 = nn.Sequential(OrderedDict(stem))
        self.d0 = _ResidualStage(64, (64, 64, 256), 3, stride=1)
        self.d1 = _ResidualStage(256, (128, 128, 512), 4, stride=2)
        self.d2 = _ResidualStage(512, (256, 256, 1024), 6, stride=2)
        self.d3 = _ResidualStage(1024, (512, 512, 2048), 3, stride=2)
        self.conv_bot = _conv(2048, 1024, 1)
        ksize = LAYOUTS[mode].decoder_ksize
        branches: list[tuple[str, nn.Module]] = []
        if num_types is not None:
            branches.append(("tp", _decoder_branch(num_types, ksize)))
        branches += [("np", _decoder_branch(2, ksize)), ("hv", _decoder_branch(2, ksize))]
        self.decoder = nn.ModuleDict(OrderedDict(branches))
        self.upsample2x = _Upsample2x()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        d0 = self.d0(self.conv0(images / 255.0))
        d1 = self.d1(d0)
        d2 = self.d2(d1)
        d3 = self.conv_bot(self.d3(d2))
        # the skips lose what the valid decoder convolutions remove
        crop0, crop1 = (184, 72) if self.mode == "original" else (92, 36)
        skip0, skip1 = _centre_crop(d0, crop0, crop0), _centre_crop(d1, crop1, crop1)
        out = {}
        for name, branch in self.decoder.items():
            u3, u2, u1, u0 = branch.children()
            x = u3(self.upsample2x(d3) + d2)
            x = u2(self.upsample2x(x) + skip1)
            x = u1(self.upsample2x(x) + skip0)
            out[name] = u0(x)
        return out


# ---------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: tiatoolbox's bare ``state_dict``, or the HoVer-Net
    authors' ``{"desc": state_dict}`` (a ``module.`` prefix from DataParallel is removed)."""
    if not path.is_file():
        raise FeatureError(f"nucleus model {path} does not exist: put the HoVer-Net checkpoint "
                           f"there (tiatoolbox's hovernet_fast-pannuke.pth, say) and point "
                           f"[features] nuclei_model at it (models are never downloaded)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise FeatureError(f"nucleus model {path} is not a torch checkpoint: "
                           f"{str(error).splitlines()[0]}") from error
    if isinstance(loaded, Mapping) and "desc" in loaded and isinstance(loaded["desc"], Mapping):
        loaded = loaded["desc"]
    if not (isinstance(loaded, Mapping) and loaded
            and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in loaded.items())):
        raise FeatureError(f"nucleus model {path} must hold a HoVer-Net state_dict (names → "
                           f"tensors), got {type(loaded).__name__}")
    if all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return dict(loaded)


def load_hovernet(path: Path | str) -> HoVerNet:
    """Build the HoVer-Net that ``path`` holds and load it strictly.

    The mode comes from the decoder's kernel (3: fast, 5: original) and the number of types from
    the TP head (absent: instance segmentation only).

    Raises
    ------
    FeatureError
        Naming ``path``: not a checkpoint, not HoVer-Net, or keys missing, unexpected or of the
        wrong shape.
    """
    path = Path(path)
    state = _checkpoint_tensors(path)
    probe = state.get("decoder.np.u3.conva.weight")
    kernels = {layout.decoder_ksize: name for name, layout in LAYOUTS.items()}
    if probe is None or probe.ndim != 4 or probe.shape[-1] not in kernels:
        raise FeatureError(f"nucleus model {path} is not a HoVer-Net checkpoint in tiatoolbox's "
                           f"layout: no decoder.np.u3.conva.weight with a 3×3 or 5×5 kernel")
    mode = kernels[probe.shape[-1]]
    tp = state.get("decoder.tp.u0.conv.weight")
    num_types = int(tp.shape[0]) if tp is not None else None
    model = HoVerNet(num_types, mode)
    expected = model.state_dict()
    # BatchNorm counters are absent from checkpoints converted from TensorFlow; torch's strict
    # load fills them (as it does for tiatoolbox), so they are not missing
    missing = sorted(k for k in set(expected) - set(state)
                     if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({some(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
        if wrong:
            problems.append(f"{len(wrong)} of the wrong shape ("
                            + ", ".join(f"{k} {tuple(state[k].shape)} ≠ "
                                        f"{tuple(expected[k].shape)}" for k in wrong[:3]) + ")")
        raise FeatureError(f"nucleus model {path} does not fit HoVer-Net ({mode}, "
                           f"{num_types or 'no'} types): keys " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# decoding (tiatoolbox's _proc_np_hv and get_instance_info, without OpenCV)


def _minmax(x: np.ndarray) -> np.ndarray:
    """Rescale to [0, 1] (all zeros when ``x`` is constant), as ``cv2.normalize`` MINMAX."""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 0:
        return np.zeros(x.shape, np.float64)
    return (x.astype(np.float64) - lo) / (hi - lo)


def sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's Sobel kernels of odd size ``ksize``: (derivative, smoothing), 1-D.

    Smoothing: binomial coefficients of order ksize − 1; derivative: binomial of order
    ksize − 2 differenced (both unnormalised; the energy map is min-max rescaled anyway).
    """
    smooth = np.array([math.comb(ksize - 1, i) for i in range(ksize)], np.float64)
    lower = np.array([math.comb(ksize - 2, i) for i in range(ksize - 1)], np.float64)
    deriv = np.concatenate([[0.0], lower]) - np.concatenate([lower, [0.0]])
    return deriv, smooth


def _sobel(image: np.ndarray, axis: int, ksize: int) -> np.ndarray:
    """First derivative along ``axis`` (1: columns, x; 0: rows, y), border reflected as
    OpenCV's default (BORDER_REFLECT_101 = scipy's ``mirror``)."""
    deriv, smooth = sobel_kernels(ksize)
    out = ndimage.correlate1d(image, deriv, axis=axis, mode="mirror")
    return ndimage.correlate1d(out, smooth, axis=1 - axis, mode="mirror")


def _remove_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    """Zero the labelled regions of fewer than ``min_px`` pixels."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


# cv2.getStructuringElement(MORPH_ELLIPSE, (5, 5))
_ELLIPSE_5 = np.array([[0, 0, 1, 0, 0],
                       [1, 1, 1, 1, 1],
                       [1, 1, 1, 1, 1],
                       [1, 1, 1, 1, 1],
                       [0, 0, 1, 0, 0]], bool)


def instances_from_np_hv(nucleus_prob: np.ndarray, hv: np.ndarray, scale: float = 1.0
                         ) -> np.ndarray:
    """Nucleus instances from HoVer-Net's NP and HV maps (tiatoolbox's ``_proc_np_hv``).

    Parameters
    ----------
    nucleus_prob
        (rows, cols) probability that a pixel is nucleus (NP softmax, channel 1).
    hv
        (rows, cols, 2) horizontal (x, channel 0) and vertical (y, channel 1) distance maps,
        each nucleus running from -1 at its left/top to +1 at its right/bottom.
    scale
        0.25 µm/px divided by the maps' µm/px: sizes the Sobel kernel (21 px at 1) and the
        smallest marker (10 px at 1), as tiatoolbox's ``scale_factor``.

    Returns
    -------
    np.ndarray
        (rows, cols) int32 labels 1..n (0 background).
    """
    blob = nucleus_prob >= NP_THRESHOLD
    blob = _remove_small(ndimage.label(blob)[0], MIN_BLOB_PX) > 0
    ksize = int(20 * scale + 1) | 1
    obj_px = math.ceil(10 * scale**2)
    h_dir, v_dir = _minmax(hv[..., 0]), _minmax(hv[..., 1])
    sobel_h = 1.0 - _minmax(_sobel(h_dir, 1, ksize))
    sobel_v = 1.0 - _minmax(_sobel(v_dir, 0, ksize))
    energy = np.maximum(sobel_h, sobel_v) - (1.0 - blob)
    energy[energy < 0] = 0
    # nuclei are mountains of (1 - energy): invert to basins, blurred by OpenCV's 3×3 Gaussian
    dist = (1.0 - energy) * blob
    for axis in (0, 1):
        dist = ndimage.correlate1d(dist, np.array([0.25, 0.5, 0.25]), axis=axis, mode="mirror")
    dist = -dist
    marker = blob & ~(energy >= ENERGY_EDGE)
    marker = ndimage.binary_fill_holes(marker)
    # OpenCV's opening: erosion treats the outside as foreground, dilation as background
    marker = ndimage.binary_erosion(marker, _ELLIPSE_5, border_value=1)
    marker = ndimage.binary_dilation(marker, _ELLIPSE_5, border_value=0)
    markers = _remove_small(ndimage.label(marker)[0], obj_px)
    labels = watershed(dist, markers=markers, mask=blob)
    # watershed keeps the marker ids: number the instances 1..n
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lookup = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lookup[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lookup[labels]


def instance_types(labels: np.ndarray, type_map: np.ndarray, num_types: int) -> np.ndarray:
    """Majority TP class per instance (tiatoolbox's ``get_instance_info``).

    Parameters
    ----------
    labels
        (rows, cols) int labels 1..n.
    type_map
        (rows, cols) int class per pixel (the TP argmax), 0 background.
    num_types
        Number of TP classes.

    Returns
    -------
    np.ndarray
        (n,) int: the most frequent class over the instance's pixels (ties: the lower id); when
        that is background and other classes occur, the most frequent of those.
    """
    n = int(labels.max(initial=0))
    counts = np.bincount(labels.ravel() * num_types + type_map.ravel().astype(np.int64),
                         minlength=(n + 1) * num_types).reshape(n + 1, num_types)[1:]
    kinds = counts.argmax(axis=1)
    fallback = (kinds == 0) & (counts[:, 1:].sum(axis=1) > 0)
    kinds[fallback] = counts[fallback, 1:].argmax(axis=1) + 1
    return kinds


def pannuke_to_nuclei(labels: np.ndarray, pannuke_kinds: np.ndarray) -> SegmentedNuclei:
    """Map PanNuke classes to sc-MTOP types, dropping dead and background-typed instances."""
    mapped = np.array([-1 if PANNUKE_TO_SCMTOP[k] is None else PANNUKE_TO_SCMTOP[k]
                       for k in pannuke_kinds], np.int64)
    keep = mapped >= 0
    lookup = np.zeros(len(mapped) + 1, np.int32)
    lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return SegmentedNuclei.from_labels(lookup[labels], mapped[keep].astype(np.int8))


# ---------------------------------------------------------------------------------------------
# the segmenter

NUCLEUS_MARGIN_UM = 10.0  # beyond the network's margin: the largest nuclear radius


class HoverNetSegmenter:
    """Nucleus segmentation and typing by a HoVer-Net checkpoint (tiatoolbox layout).

    :meth:`segment` pads the tile by the network's margin (reflected), runs it in patches whose
    outputs tile the whole array, decodes NP/HV into instances and TP into types. Tiles must
    come at the model's µm/px (:attr:`mpp`); :attr:`context_um` is the context the caller
    should read around a tile so that the reflected padding stays outside it and nuclei on its
    edge are seen whole.
    """

    def __init__(self, path: Path | str, model_mpp: float = MODEL_MPP, device: str = "cpu",
                 batch_size: int = 4) -> None:
        """Load the checkpoint at ``path`` (see :func:`load_hovernet`).

        Parameters
        ----------
        path
            Local checkpoint, a ``state_dict`` in tiatoolbox's HoVer-Net layout.
        model_mpp
            µm/px the model was trained at (0.25 for every published HoVer-Net).
        device
            torch device (``"cpu"``, ``"cuda"``).
        batch_size
            Patches per forward pass.
        """
        if not (np.isfinite(model_mpp) and model_mpp > 0):
            raise FeatureError(f"nucleus model resolution must be a positive µm/px, got "
                               f"{model_mpp}")
        try:
            target = torch.device(device)
        except RuntimeError as error:
            raise FeatureError(f"nucleus model device {device!r} is not a torch device "
                               f"(cpu, cuda, cuda:1, ...)") from error
        if target.type == "cuda" and not torch.cuda.is_available():
            raise FeatureError(f"nucleus model device {device!r}: no CUDA device here; set "
                               f"[features] nuclei_model_device = \"cpu\"")
        self.path = Path(path)
        model = load_hovernet(self.path)
        self._model = model.to(device)
        self.device = device
        self.batch_size = batch_size
        self.mode = model.mode
        self.num_types = model.num_types
        if self.num_types is not None and self.num_types != len(PANNUKE_TYPES):
            raise FeatureError(f"nucleus model {self.path} types nuclei into {self.num_types} "
                               f"classes; only PanNuke's {len(PANNUKE_TYPES)} "
                               f"({', '.join(PANNUKE_TYPES)}) are mapped to sc-MTOP types")
        self.layout = LAYOUTS[self.mode]
        self.model_mpp = float(model_mpp)
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self.name = f"hovernet-{self.mode}"
        self.version = f"{HOVERNET_VERSION}-mpp{self.model_mpp:g}-sha256-{digest}"
        LOGGER.info("HoVer-Net %s (%s types) loaded from %s on %s", self.mode,
                    self.num_types or "no", self.path, device)

    @property
    def mpp(self) -> float:
        """µm/px the tiles must come at: the model's own."""
        return self.model_mpp

    @property
    def context_um(self) -> float:
        """Context to read on each side of a tile: the network's margin plus a nuclear radius."""
        return self.layout.margin_px * self.model_mpp + NUCLEUS_MARGIN_UM

    def maps(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """NP probability (rows, cols), HV (rows, cols, 2) and TP argmax (rows, cols) or None
        over the whole of ``rgb``, by patches with valid padding."""
        rows, cols = rgb.shape[:2]
        size_in, size_out, margin = (self.layout.input_px, self.layout.output_px,
                                     self.layout.margin_px)
        n_rows, n_cols = math.ceil(rows / size_out), math.ceil(cols / size_out)
        padded = np.pad(rgb, ((margin, n_rows * size_out - rows + margin),
                              (margin, n_cols * size_out - cols + margin), (0, 0)),
                        mode="reflect")
        corners = [(r * size_out, c * size_out) for r in range(n_rows) for c in range(n_cols)]
        nucleus = np.zeros((n_rows * size_out, n_cols * size_out), np.float32)
        hv = np.zeros((*nucleus.shape, 2), np.float32)
        types = np.zeros(nucleus.shape, np.int64) if self.num_types is not None else None
        for start in range(0, len(corners), self.batch_size):
            batch = corners[start : start + self.batch_size]
            x = torch.from_numpy(np.stack([padded[r : r + size_in, c : c + size_in]
                                           for r, c in batch]))
            x = x.permute(0, 3, 1, 2).float().to(self.device)
            with torch.inference_mode():
                out = self._model(x)
                np_prob = torch.softmax(out["np"], dim=1)[:, 1].cpu().numpy()
                hv_out = out["hv"].permute(0, 2, 3, 1).cpu().numpy()
                tp_out = out["tp"].argmax(dim=1).cpu().numpy() if "tp" in out else None
            for i, (r, c) in enumerate(batch):
                nucleus[r : r + size_out, c : c + size_out] = np_prob[i]
                hv[r : r + size_out, c : c + size_out] = hv_out[i]
                if types is not None and tp_out is not None:
                    types[r : r + size_out, c : c + size_out] = tp_out[i]
        crop = (slice(0, rows), slice(0, cols))
        return nucleus[crop], hv[crop], types[crop] if types is not None else None

    def segment(self, rgb: np.ndarray, mpp: float) -> SegmentedNuclei:
        """Segment and type the nuclei of ``rgb`` ((rows, cols, 3) uint8) at ``mpp`` µm/px.

        Raises
        ------
        FeatureError
            ``mpp`` more than 10 % away from the model's µm/px.
        """
        check_tile(rgb, mpp)
        if abs(mpp - self.model_mpp) > 0.1 * self.model_mpp:
            raise FeatureError(f"nucleus model {self.path} works at {self.model_mpp} µm/px, the "
                               f"tile is at {mpp} µm/px: read the tile at the model's resolution")
        nucleus, hv, types = self.maps(rgb)
        labels = instances_from_np_hv(nucleus, hv, scale=MODEL_MPP / self.model_mpp)
        if types is None:
            measurements = typing_measurements(labels, stain_density(rgb), mpp)
            return SegmentedNuclei.from_labels(labels, default_type_model().predict(measurements))
        return pannuke_to_nuclei(labels, instance_types(labels, types, len(PANNUKE_TYPES)))
