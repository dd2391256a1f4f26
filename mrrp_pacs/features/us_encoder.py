"""The ultrasound encoder: the lesion crop it sees, :class:`UsResNet`, its training and its
place in the model store.

The encoder is trained in this project without outcome labels, by 4-way rotation prediction on
lesion crops (:func:`train_us_encoder`), and kept in the model store under kind ``us-encoder``
(:func:`save_us_encoder`, :func:`load_us_encoder`). The branch as a whole is sketched in
:mod:`mrrp_pacs.features.us_image`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch
from skimage.transform import resize
from torch import nn
from torch.nn import functional

from model_store import ModelStore, ModelVersion
from mrrp_pacs.errors import FeatureError, ModelStoreError
from mrrp_pacs.features.us_roi import Box, clip_box

LOGGER = logging.getLogger(__name__)

CROP_MARGIN_PX = 6
CROP_SIZE_PX = 256


def crop_roi(gray: np.ndarray, box: Box, margin_px: int = CROP_MARGIN_PX,
             size_px: int = CROP_SIZE_PX) -> np.ndarray:
    """The lesion crop the encoder sees.

    The box grows by ``margin_px`` on every side (clipped to the image); the shorter side is
    then zero-padded symmetrically to a square, so the aspect ratio is kept (orientation —
    taller than wide — is a BI-RADS feature), and the square is resized to ``size_px`` with
    bilinear interpolation (Gaussian anti-aliasing when shrinking). Absolute size is not kept.

    Parameters
    ----------
    gray : np.ndarray
        (rows, columns) grayscale in [0, 255].
    box : Box
    margin_px : int
    size_px : int

    Returns
    -------
    np.ndarray
        (size_px, size_px) float32 in [0, 255].

    Raises
    ------
    FeatureError
        The box is outside the image or has no area inside it.
    """
    x0, y0, x1, y1 = clip_box(box, gray.shape, "crop")
    x0, y0 = max(x0 - margin_px, 0), max(y0 - margin_px, 0)
    x1, y1 = min(x1 + margin_px, gray.shape[1] - 1), min(y1 + margin_px, gray.shape[0] - 1)
    patch = gray[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    side = max(patch.shape)
    top, left = (side - patch.shape[0]) // 2, (side - patch.shape[1]) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    out = resize(square, (size_px, size_px), order=1, anti_aliasing=side > size_px,
                 preserve_range=True)
    return np.clip(out, 0.0, 255.0).astype(np.float32)


US_ENCODER_VERSION = "1"
US_ENCODER_KIND = "us-encoder"
US_ENCODER_NAME = "usresnet-small"
PRETEXT_TASK = "rotation-4way"
TOKEN_GRID = 16
TOKEN_DIM = 64
ARCHITECTURE: dict[str, Any] = {
    "name": "UsResNet",
    "input": [1, CROP_SIZE_PX, CROP_SIZE_PX],
    "stem": {"kernel": 4, "stride": 4, "width": 16},
    "stages": [{"width": 32, "stride": 2}, {"width": TOKEN_DIM, "stride": 2}],
    "blocks_per_stage": 1,
    "norm": "GroupNorm(4)",
    "feature_map": [TOKEN_DIM, TOKEN_GRID, TOKEN_GRID],
    "pretext_head": {"pool": [4, 4], "classes": 4},
}


class _BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convolutions) with a projection shortcut when the shape
    changes."""

    def __init__(self, in_width: int, out_width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, out_width, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(4, out_width)
        self.conv2 = nn.Conv2d(out_width, out_width, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(4, out_width)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_width != out_width:
            self.shortcut = nn.Sequential(nn.Conv2d(in_width, out_width, 1, stride, bias=False),
                                          nn.GroupNorm(4, out_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = functional.relu(self.norm1(self.conv1(x)))
        return functional.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class UsResNet(nn.Module):
    """Lightweight ResNet for 1 × 256 × 256 ultrasound crops; last residual block 64 × 16 × 16.

    Stem: 4 × 4 convolution, stride 4 → 16 × 64 × 64 (a patchifying stem: a classic stride-2
    stem spends most of its CPU time on 128 × 128 maps and made training ~2.5 × slower here).
    Two stages of one basic block each: 32 @ 32 × 32 (stride 2), then 64 @ 16 × 16 (stride 2),
    whose output is the token map. GroupNorm (4 groups) instead of BatchNorm: training batches
    are small (16 crops, a few hundred patients in all), and the encoder then behaves the same
    in training and inference, one crop at a time, with no running statistics to drift.
    The pretext head (rotation, 4 classes) is linear on the map average-pooled to 4 × 4: with
    a global average pool the head cannot see where things are, and rotation on 64 crops did
    not get below chance in 6 epochs.

    Input crops are grayscale in [0, 255]; they are scaled to [-1, 1] inside the model.
    """

    def __init__(self) -> None:
        super().__init__()
        stem = ARCHITECTURE["stem"]
        self.stem = nn.Sequential(nn.Conv2d(1, stem["width"], stem["kernel"], stem["stride"],
                                            bias=False),
                                  nn.GroupNorm(4, stem["width"]), nn.ReLU())
        blocks, width = [], stem["width"]
        for stage in ARCHITECTURE["stages"]:
            blocks.append(_BasicBlock(width, stage["width"], stage["stride"]))
            width = stage["width"]
        self.blocks = nn.Sequential(*blocks)
        head = ARCHITECTURE["pretext_head"]
        self.head = nn.Linear(width * head["pool"][0] * head["pool"][1], head["classes"])
        # a zero head starts the pretext at chance (loss ln 4) instead of a random bias
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def feature_map(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 1, 256, 256) crops in [0, 255] → (n, 64, 16, 16) output of the last block."""
        return self.blocks(self.stem(crops / 127.5 - 1.0))

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 1, 256, 256) → (n, 256, 64) tokens: the 16 × 16 map flattened row-major."""
        return self.feature_map(crops).flatten(2).transpose(1, 2)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 1, 256, 256) → (n, 4) rotation logits (k × 90° counter-clockwise)."""
        pooled = functional.adaptive_avg_pool2d(self.feature_map(crops),
                                                ARCHITECTURE["pretext_head"]["pool"])
        return self.head(pooled.flatten(1))


def token_positions() -> np.ndarray:
    """(256, 2) int (row, column) of each token in the 16 × 16 grid, the order of
    :meth:`UsResNet.encode`; token (r, c) covers crop pixels [16 r, 16 r + 16) × [16 c, 16 c + 16).
    """
    rows, columns = np.divmod(np.arange(TOKEN_GRID * TOKEN_GRID), TOKEN_GRID)
    return np.stack([rows, columns], axis=1)


def encode_crops(model: UsResNet, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Tokens of each crop.

    Parameters
    ----------
    model : UsResNet
    crops : np.ndarray
        (n, 256, 256) grayscale in [0, 255] (from :func:`crop_roi`).
    batch_size : int

    Returns
    -------
    np.ndarray
        (n, 256, 64) float32; positions from :func:`token_positions`.
    """
    _check_crops(crops)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(crops), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(crops[start : start + batch_size],
                                                          dtype=np.float32))
            out.append(model.encode(batch[:, None]).numpy())
    return np.concatenate(out) if out else np.zeros((0, TOKEN_GRID**2, TOKEN_DIM), np.float32)


def _check_crops(crops: np.ndarray) -> None:
    if crops.ndim != 3 or crops.shape[1:] != (CROP_SIZE_PX, CROP_SIZE_PX):
        raise FeatureError(f"crops must be (n, {CROP_SIZE_PX}, {CROP_SIZE_PX}), got "
                           f"{crops.shape}")


@dataclass(frozen=True)
class PretextHistory:
    """What one training run did; ``losses`` are mean cross-entropy (nats) per epoch."""

    losses: list[float]
    accuracies: list[float]
    seconds: float
    n_crops: int
    epochs: int
    seed: int
    batch_size: int
    learning_rate: float


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch and demand deterministic kernels, restoring the caller's state after."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


def train_us_encoder(crops: np.ndarray, *, epochs: int = 6, seed: int = 0, batch_size: int = 16,
                     learning_rate: float = 1e-3) -> tuple[UsResNet, PretextHistory]:
    """Train :class:`UsResNet` by 4-way rotation prediction (no outcome labels).

    Why rotation: B-mode images have a strong up/down and depth structure (skin on top,
    posterior shadowing or enhancement below the lesion, attenuation with depth), so telling
    0/90/180/270° apart forces the encoder to represent the lesion's orientation, posterior
    features and outline — the BI-RADS descriptors — while needing no negatives, large batches
    or long schedules (unlike SimCLR), which a few hundred crops on a CPU cannot afford. Each
    epoch every crop is seen once, randomly mirrored left-right (anatomy has no left/right
    preference) and rotated by a random multiple of 90°.

    Deterministic on CPU for a given seed and thread count (seeded generator,
    ``torch.use_deterministic_algorithms``; the caller's RNG and flags are restored).

    Parameters
    ----------
    crops : np.ndarray
        (n, 256, 256) grayscale crops in [0, 255] (from :func:`crop_roi`).
    epochs, seed, batch_size : int
    learning_rate : float
        Adam step size.

    Returns
    -------
    tuple[UsResNet, PretextHistory]
        The model in eval mode, and per-epoch loss and accuracy.
    """
    _check_crops(crops)
    if len(crops) == 0 or epochs < 1:
        raise FeatureError(f"training needs crops and epochs ≥ 1 (got {len(crops)} crops, "
                           f"{epochs} epochs)")
    data = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))[:, None]
    losses, accuracies = [], []
    started = time.perf_counter()
    with _seeded(seed):
        generator = torch.Generator().manual_seed(seed)
        model = UsResNet()
        optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            total_loss, correct = 0.0, 0
            for start in range(0, len(data), batch_size):
                batch = data[order[start : start + batch_size]]
                mirror = torch.rand(len(batch), generator=generator) < 0.5
                batch = torch.where(mirror[:, None, None, None], batch.flip(-1), batch)
                turns = torch.randint(0, 4, (len(batch),), generator=generator)
                rotated = torch.empty_like(batch)
                for k in range(4):
                    chosen = turns == k
                    rotated[chosen] = torch.rot90(batch[chosen], k, dims=(2, 3))
                logits = model(rotated)
                loss = functional.cross_entropy(logits, turns)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total_loss += float(loss.detach()) * len(batch)
                correct += int((logits.argmax(1) == turns).sum())
            losses.append(total_loss / len(data))
            accuracies.append(correct / len(data))
            LOGGER.info("us encoder epoch %d/%d: loss %.4f, accuracy %.3f", epoch + 1, epochs,
                        losses[-1], accuracies[-1])
    model.eval()
    history = PretextHistory(losses, accuracies, time.perf_counter() - started, len(crops),
                             epochs, seed, batch_size, learning_rate)
    return model, history


def save_us_encoder(store: ModelStore, model: UsResNet, history: PretextHistory,
                    training_info: Mapping[str, Any], name: str = US_ENCODER_NAME
                    ) -> ModelVersion:
    """Store weights (``weights.safetensors``) and a manifest under kind ``us-encoder``.

    ``training_info`` is the caller's provenance (e.g. which cases the crops came from, how
    the ROIs were found); it must be JSON-able and is kept under ``training.provenance``.
    """
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    manifest = {
        "code_version": US_ENCODER_VERSION,
        "architecture": ARCHITECTURE,
        "input_size_px": [CROP_SIZE_PX, CROP_SIZE_PX],
        "input_range": [0, 255],
        "output_shape": [TOKEN_DIM, TOKEN_GRID, TOKEN_GRID],
        "tokens": [TOKEN_GRID * TOKEN_GRID, TOKEN_DIM],
        "pretext_task": PRETEXT_TASK,
        "crop": {"margin_px": CROP_MARGIN_PX, "aspect_ratio": "kept (zero padding)",
                 "interpolation": "bilinear"},
        "training": {**asdict(history), "final_loss": history.losses[-1],
                     "provenance": dict(training_info)},
    }
    return store.save(US_ENCODER_KIND, name, {"weights.safetensors": weights}, manifest)


def load_us_encoder(store: ModelStore, version: str | None = None,
                    name: str = US_ENCODER_NAME) -> tuple[UsResNet, ModelVersion]:
    """The stored encoder (given version, else promoted, else latest), in eval mode.

    Raises
    ------
    ModelStoreError
        Missing or altered files (checked by the store), or a manifest written for another
        architecture or code version than this module's.
    """
    stored = store.load(US_ENCODER_KIND, name, version)
    manifest = stored.manifest
    if manifest.get("code_version") != US_ENCODER_VERSION:
        raise ModelStoreError(
            f"{stored.label} was written by us-encoder code version "
            f"{manifest.get('code_version')!r}, this code is {US_ENCODER_VERSION!r}: train a new "
            "encoder (mrrp-pacs train-encoder us)")
    if manifest.get("architecture") != ARCHITECTURE:
        raise ModelStoreError(f"{stored.label} describes another architecture than this code's "
                              "UsResNet: train a new encoder (mrrp-pacs train-encoder us)")
    model = UsResNet()
    try:
        model.load_state_dict(safetensors.torch.load_file(stored.file("weights.safetensors")))
    except (RuntimeError, OSError) as exc:
        raise ModelStoreError(f"{stored.label}: weights do not fit UsResNet ({exc})") from exc
    model.eval()
    return model, stored


def train_from_crops(store: ModelStore, crops: np.ndarray, *, epochs: int = 6, seed: int = 0,
                     training_info: Mapping[str, Any] | None = None) -> ModelVersion:
    """Train on ``crops`` (n, 256, 256) and store the result: the body of
    ``mrrp-pacs train-encoder us``. Returns the new (not yet promoted) version."""
    model, history = train_us_encoder(crops, epochs=epochs, seed=seed)
    return save_us_encoder(store, model, history, training_info or {})
