"""The MRRP fusion network: WSI + ultrasound tokens + clinical tokens → log hazard.

Data flow for B patients (docs/model.md; each family's token shape in
:data:`mrrp_pacs.model.dataset.FAMILY_SOURCES`)::

    family tokens (B, N, D_f) ─ standardise (fitted buffers) ─ Linear → (B, N, d_model)
        [+ Fourier position code] [+ slot embedding] [+ family-type embedding for keys]
    intramodality   query family ─ single-head cross-attention → other families of the modality
                    LayerNorm(query + attention)                          (B, N_query, d_model)
    attention-MIL   gated attention pooling (Ilse et al. 2018)            (B, d_model)
    missing         absent modality → its zero-initialised learned vector
    intermodality   Linear + GELU per modality, concatenated → F_inter    (B, M × d_model)
    clinical        one 1024-d token per variable                         (B, V, clinical_dim)
    fusion          F_inter queries the clinical tokens, residual add, dropout, Linear → risk (B,)

Risk is a log hazard: higher = worse. It has no constant term (the risk head has no bias): the
Cox partial likelihood cannot see one, and the Breslow baseline hazard carries the level.

Decisions where the paper leaves room, and why:

- **Standardisation lives in the model.** :meth:`MrrpFusion.fit_normalisation` stores each
  family's per-feature mean/std (real tokens only, padding excluded) and each continuous clinical
  variable's mean/std as buffers, so a saved ``state_dict`` scores raw features on its own. A
  model whose statistics were never fitted refuses to run. Families whose token *i* always means
  the same thing (radiomics: one token per image type × feature class, raw values differing by
  orders of magnitude between classes) are "slotted": standardised per (slot, feature) and given a
  learned slot embedding, since attention otherwise sees an unordered set.
- **Position code.** Slide placement is arbitrary, so positions are taken relative to the
  patient's token centroid (masked), scaled to mm (WSI, µm ÷ 1000) or to the lesion crop's side
  (US, grid index ÷ 16), then encoded by fixed sinusoids of wavelengths 0.125–4 units and a
  Linear. Added to query and key tokens, the dot product gains cos(ω Δx) terms, so a tile's deep
  token can find its own and its neighbours' morphology/topology tokens (same tiles, same
  positions) — without it the WSI cross-attention cannot tell which key came from which tile.
- **Attention masks.** Padded keys get the dtype's lowest score and an exact zero weight; a
  patient with no key tokens gets a zero attention term, so its tokens are
  ``LayerNorm(query)``: unchanged by attention, and on the same scale as everyone else's.
- **Presence.** A modality counts as present for a patient when ``batch.present`` says so *and*
  its query family has tokens (with the ``queries`` switch, the query may be a family that is
  missing although the modality is present).
- **Modality dropout** (training only): each present imaging modality of a patient is replaced by
  its missing vector with probability ``modality_dropout``, independently; when that would leave
  a patient with no imaging modality, one of the dropped ones (uniformly at random) is restored,
  so a patient with a single imaging modality is never dropped. A dropped modality's patch
  attention is 0, as for an absent one.
- **Non-attention fusion** ("concat", "add", "multiply") uses the mean of the clinical tokens
  projected to F_inter's width; the mean is attention with equal weights, so their
  ``clinical_attention`` output is uniform, 1 / V.
- **No bias where softmax cannot see it** (key projections, the MIL score): a constant added to
  every score of a softmax changes nothing and would get no gradient.
- Single-head attention over one key token returns that token whatever the query, so the
  clinical cross-attention needs at least two clinical variables (checked by :class:`FusionConfig`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

MODALITY_FAMILIES: dict[str, tuple[str, ...]] = {
    "wsi": ("wsi_deep", "wsi_morphology", "wsi_topology"),
    "us": ("us_deep", "us_radiomics", "us_text"),
}
FAMILY_MODALITY = {family: modality for modality, families in MODALITY_FAMILIES.items()
                   for family in families}
# Families whose tokens carry positions, and the key of ``Batch.positions`` holding them.
POSITIONED_FAMILIES = {"wsi_deep": "wsi", "wsi_morphology": "wsi", "wsi_topology": "wsi",
                       "us_deep": "us"}
# Position units → encoding units: WSI µm → mm; US (row, column) in the 16 × 16 token grid →
# fraction of the lesion crop's side.
POSITION_SCALES = {"wsi": 1e-3, "us": 1.0 / 16.0}
POSITION_WAVELENGTHS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
FUSION_STRATEGIES = ("cross-attention", "concat", "add", "multiply")
FusionStrategy = Literal["cross-attention", "concat", "add", "multiply"]
ClinicalSpec = tuple[tuple[str, str, int], ...]
"""(name, kind, n_levels) per clinical variable, in column order; kind "continuous" (n_levels
0) or "categorical" (n_levels ≥ 1, values are level indices 0 … n_levels − 1)."""

_EMBEDDING_INIT_STD = 0.02


@dataclass
class FamilyTokens:
    """One feature family of a batch.

    Attributes
    ----------
    tokens : Tensor
        (B, N, D) float32, zero on padding.
    mask : Tensor
        (B, N) bool, True for a real token; all False for a patient missing the family.
    """

    tokens: Tensor
    mask: Tensor


@dataclass
class Batch:
    """B patients, as the data contract defines them.

    Attributes
    ----------
    families : dict[str, FamilyTokens]
        Keys among :data:`FAMILY_MODALITY`; families the model does not use are ignored.
    positions : dict[str, Tensor]
        "wsi": (B, T, 2) tile centres in µm, for the T tiles of every WSI family;
        "us": (B, 256, 2) (row, column) in the 16 × 16 token grid of ``us_deep``.
        Needed only when the model's positional encoding is on.
    present : dict[str, Tensor]
        (B,) bool per modality ("wsi", "us").
    clinical_values : Tensor
        (B, V) float: continuous value in the schema's unit, or level index (categorical).
    clinical_missing : Tensor
        (B, V) bool.
    time : Tensor or None
        (B,) months to recurrence or censoring (training and evaluation only).
    event : Tensor or None
        (B,) bool, True = recurrence observed.
    """

    families: dict[str, FamilyTokens]
    positions: dict[str, Tensor]
    present: dict[str, Tensor]
    clinical_values: Tensor
    clinical_missing: Tensor
    time: Tensor | None = None
    event: Tensor | None = None


@dataclass
class FusionOutput:
    """What :class:`MrrpFusion` returns.

    Attributes
    ----------
    risk : Tensor
        (B,) log hazard, higher = worse.
    clinical_attention : Tensor
        (B, V) attention of the fused query over the clinical tokens (rows sum to 1; uniform
        1 / V for the non-attention fusion strategies).
    patch_attention : dict[str, Tensor]
        Per modality the model uses: (B, N_query) attention-MIL weights over the query family's
        tokens ("wsi": (B, T), "us": (B, 256) with the default queries); 0 on padding and for a
        patient whose modality is absent (or dropped in training).
    """

    risk: Tensor
    clinical_attention: Tensor
    patch_attention: dict[str, Tensor]


DEFAULT_QUERIES = {"wsi": "wsi_deep", "us": "us_deep"}


@dataclass(frozen=True)
class FusionConfig:
    """Everything that shapes an :class:`MrrpFusion`; JSON-able through :meth:`to_dict`.

    Attributes
    ----------
    family_dims : dict[str, int]
        Input width of each family the data provides, e.g. ``{"wsi_deep": 79}``.
    clinical : ClinicalSpec
        The clinical variables, in the column order of ``Batch.clinical_values``.
    d_model : int
        Width of tokens and modality vectors.
    clinical_dim : int
        Width of a clinical token (1024 in the paper).
    dropout : float
        Dropout before the risk head (0.2 in the paper).
    fusion : {"cross-attention", "concat", "add", "multiply"}
        How F_inter meets the clinical tokens (the paper's fusion ablation).
    queries : dict[str, str]
        The query family of each modality (the paper's query-choice ablation).
    families : tuple of str or None
        Families the model uses (the intramodality feature-removal ablation); None = every
        family of ``family_dims``. A modality none of whose families is used is left out.
    token_slots : dict[str, int]
        Families whose token *i* always means the same thing, with their fixed token count:
        standardised per (slot, feature) and given a slot embedding. Entries for families the
        model does not use are ignored.
    modality_dropout : float
        Training-time probability of replacing a present imaging modality by its missing
        vector (see the module docstring for the rule that keeps one modality).
    positional_encoding : bool
        Add the position code to positioned families (WSI tiles, the US token grid).
    missing : {"learned", "zero"}
        What stands for an absent modality: its learned vector (the paper's compensation) or
        zeros (the "ignore" arm of the compensation ablation).
    compensated : tuple of str
        Modalities the cohort has no data for at all (a clinical-only table): their branch is
        never fitted nor run, and only their learned missing vector enters F_inter.
    input_components : int
        0 = project each family's standardised features directly; k > 0 = first reduce a family
        wider than k to its k principal components (fitted on the training tokens, no outcome).
    """

    family_dims: dict[str, int]
    clinical: ClinicalSpec
    d_model: int = 128
    clinical_dim: int = 1024
    dropout: float = 0.2
    fusion: FusionStrategy = "cross-attention"
    queries: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_QUERIES))
    families: tuple[str, ...] | None = None
    # 49 = PyRadiomics tokens at the default settings of mrrp_pacs.features.radiomics
    token_slots: dict[str, int] = field(default_factory=lambda: {"us_radiomics": 49})
    modality_dropout: float = 0.0
    positional_encoding: bool = True
    missing: Literal["learned", "zero"] = "learned"
    compensated: tuple[str, ...] = ()
    input_components: int = 0

    def __post_init__(self) -> None:
        # Own copies (a caller's dict must not change a built model's config); JSON hands back
        # lists where tuples are meant.
        object.__setattr__(self, "family_dims",
                           {str(f): int(d) for f, d in dict(self.family_dims).items()})
        object.__setattr__(self, "queries", {str(m): str(f) for m, f in dict(self.queries).items()})
        object.__setattr__(self, "token_slots",
                           {str(f): int(n) for f, n in dict(self.token_slots).items()})
        object.__setattr__(self, "clinical",
                           tuple((str(n), str(k), int(levels)) for n, k, levels in self.clinical))
        if self.families is not None:
            object.__setattr__(self, "families", tuple(self.families))
        object.__setattr__(self, "compensated", tuple(self.compensated))
        self._validate()

    def _validate(self) -> None:
        dims = self.family_dims
        for family, dim in dims.items():
            if family not in FAMILY_MODALITY:
                raise ValueError(f"family_dims: unknown family {family!r}; known: "
                                 f"{sorted(FAMILY_MODALITY)}")
            if dim < 1:
                raise ValueError(f"family_dims[{family!r}] = {dim}: must be ≥ 1")
        for family in self.families or ():
            if family not in dims:
                raise ValueError(f"families: {family!r} has no entry in family_dims")
        if not self.used_families:
            raise ValueError("the configuration uses no feature family")
        for modality in self.modalities:
            query = self.queries.get(modality)
            if query is None:
                raise ValueError(f"queries: no query family for modality {modality!r}")
            if query not in self.used_families or FAMILY_MODALITY[query] != modality:
                raise ValueError(f"queries[{modality!r}] = {query!r}: must be a used family of "
                                 f"that modality ({self.modality_families(modality)})")
        for family, slots in self.token_slots.items():
            if family not in FAMILY_MODALITY or slots < 2:
                raise ValueError(f"token_slots: ({family!r}, {slots}) needs a known family and "
                                 "≥ 2 slots")
        names = [name for name, _, _ in self.clinical]
        if len(set(names)) != len(names):
            raise ValueError(f"clinical: duplicate variable names in {names}")
        for name, kind, levels in self.clinical:
            if kind == "continuous" and levels != 0:
                raise ValueError(f"clinical {name!r}: a continuous variable has n_levels 0")
            if kind == "categorical" and levels < 1:
                raise ValueError(f"clinical {name!r}: a categorical variable needs n_levels ≥ 1")
            if kind not in ("continuous", "categorical"):
                raise ValueError(f"clinical {name!r}: kind {kind!r} is not 'continuous' or "
                                 "'categorical'")
        minimum = 2 if self.fusion == "cross-attention" else 1
        if len(self.clinical) < minimum:
            raise ValueError(f"clinical: {len(self.clinical)} variable(s); fusion {self.fusion!r}"
                             f" needs ≥ {minimum} (single-head attention over one token ignores "
                             "its query)")
        if self.fusion not in FUSION_STRATEGIES:
            raise ValueError(f"fusion = {self.fusion!r}: expected one of {FUSION_STRATEGIES}")
        if self.d_model < 1 or self.clinical_dim < 1:
            raise ValueError("d_model and clinical_dim must be ≥ 1")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError("dropout and modality_dropout must be in [0, 1)")
        if self.missing not in ("learned", "zero"):
            raise ValueError(f"missing = {self.missing!r}: expected 'learned' or 'zero'")
        for modality in self.compensated:
            if modality not in self.modalities:
                raise ValueError(f"compensated: {modality!r} is not a modality of this "
                                 f"configuration {self.modalities}")

    @property
    def used_families(self) -> tuple[str, ...]:
        """Families the model uses, in the order of :data:`MODALITY_FAMILIES`."""
        chosen = self.families if self.families is not None else self.family_dims
        return tuple(f for fams in MODALITY_FAMILIES.values() for f in fams if f in chosen)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities with at least one used family, in the order of F_inter."""
        return tuple(m for m, fams in MODALITY_FAMILIES.items()
                     if any(f in self.used_families for f in fams))

    def modality_families(self, modality: str) -> tuple[str, ...]:
        """Used families of one modality."""
        return tuple(f for f in MODALITY_FAMILIES[modality] if f in self.used_families)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for the model store manifest); :meth:`from_dict` reverses it."""
        return {
            "family_dims": dict(self.family_dims),
            "clinical": [list(variable) for variable in self.clinical],
            "d_model": self.d_model,
            "clinical_dim": self.clinical_dim,
            "dropout": self.dropout,
            "fusion": self.fusion,
            "queries": dict(self.queries),
            "families": None if self.families is None else list(self.families),
            "token_slots": dict(self.token_slots),
            "modality_dropout": self.modality_dropout,
            "positional_encoding": self.positional_encoding,
            "missing": self.missing,
            "compensated": list(self.compensated),
            "input_components": self.input_components,
        }

    def __hash__(self) -> int:
        # The generated hash would fail on the dict fields; equal configs have equal JSON.
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionConfig:
        """Rebuild a configuration from :meth:`to_dict` output (or its JSON round trip)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"FusionConfig: unknown keys {sorted(unknown)}")
        return cls(**data)


class FamilyEncoder(nn.Module):
    """Standardise one family's raw tokens, optionally reduce them, project to ``d_model``.

    Buffers ``mean`` and ``std`` are (1, D) — per feature — or (S, D) for a slotted family.
    With ``components`` k < D, a (D, k) ``basis`` (principal axes of the standardised training
    tokens, each scaled to unit variance) reduces the tokens before the projection: fitted
    without outcomes, it keeps the few directions the data vary along and leaves far fewer
    weights to learn from a few hundred patients.
    """

    mean: Tensor
    std: Tensor
    basis: Tensor

    def __init__(self, dim: int, d_model: int, slots: int | None, components: int = 0) -> None:
        super().__init__()
        rows = slots or 1
        self.slots = slots
        self.reduced = 0 < components < dim
        width = components if self.reduced else dim
        self.register_buffer("mean", torch.zeros(rows, dim))
        self.register_buffer("std", torch.ones(rows, dim))
        if self.reduced:
            self.register_buffer("basis", torch.eye(dim, width))
        self.project = nn.Linear(width, d_model)
        self.slot_embedding = (nn.Parameter(torch.randn(slots, d_model) * _EMBEDDING_INIT_STD)
                               if slots else None)

    @torch.no_grad()
    def fit(self, tokens: Tensor, mask: Tensor, family: str) -> None:
        """Set ``mean``/``std`` (and ``basis``) from real tokens (B, N, D) with mask (B, N)."""
        x = tokens.to(torch.float64)
        weight = mask.to(torch.float64)[..., None]
        if not mask.any():
            raise ValueError(f"fit_normalisation: family {family!r} has no real token in the "
                             "batch; a family never seen in training cannot be standardised")
        # Per slot for slotted families (reduce over patients), per feature otherwise.
        dims = (0,) if self.slots else (0, 1)
        count = weight.sum(dims)
        mean = (x * weight).sum(dims) / count.clamp(min=1)
        var = (((x - mean) ** 2) * weight).sum(dims) / count.clamp(min=1)
        std = var.sqrt()
        # A constant (or zero-padded, or unseen) feature carries nothing; std 1 keeps it finite.
        flat = (std <= 1e-8 * mean.abs().clamp(min=1.0)) | (count == 0)
        std = torch.where(flat, torch.ones_like(std), std)
        mean = torch.where(count == 0, torch.zeros_like(mean), mean)
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.reshape(self.std.shape))
        if self.reduced:
            z = ((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))[mask]  # (tokens, D)
            eigenvalues, eigenvectors = torch.linalg.eigh(z.T @ z / max(len(z), 1))
            k = self.basis.shape[1]
            top = torch.flip(torch.arange(eigenvectors.shape[1]), (0,))[:k]
            scale = eigenvalues[top].clamp(min=1e-8).rsqrt()
            self.basis.copy_((eigenvectors[:, top] * scale).to(self.basis.dtype))

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, D) raw → (B, N, d_model)."""
        standard = (tokens.to(self.mean.dtype) - self.mean) / self.std
        projected = self.project(standard @ self.basis if self.reduced else standard)
        if self.slot_embedding is not None:
            projected = projected + self.slot_embedding
        return projected


class PositionEncoding(nn.Module):
    """Centred, scaled 2-D positions → fixed sinusoids → Linear to ``d_model``."""

    angular: Tensor

    def __init__(self, scale: float, d_model: int) -> None:
        super().__init__()
        self.scale = scale
        wavelengths = torch.tensor(POSITION_WAVELENGTHS)
        self.register_buffer("angular", 2.0 * math.pi / wavelengths, persistent=False)
        self.project = nn.Linear(4 * len(POSITION_WAVELENGTHS), d_model)

    def forward(self, positions: Tensor, mask: Tensor) -> Tensor:
        """(B, N, 2) positions in the source's unit, (B, N) mask → (B, N, d_model)."""
        scaled = positions.to(self.angular.dtype) * self.scale
        weight = mask.to(scaled.dtype)[..., None]
        centre = (scaled * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
        angles = (scaled - centre)[..., None] * self.angular  # (B, N, 2, F)
        code = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2)
        return self.project(code)


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis; masked entries get exactly 0, all-masked rows are all 0."""
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return filled.softmax(dim=-1) * mask


class CrossAttention(nn.Module):
    """Single-head scaled dot-product attention of queries over masked keys.

    Parameters
    ----------
    query_dim, key_dim : int
        Widths of query and key/value tokens.
    attention_dim : int
        Width of the space where queries meet keys.
    value_dim : int
        Width of the output (that of the residual it is added to).
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int, value_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(query_dim, attention_dim)
        self.key = nn.Linear(key_dim, attention_dim, bias=False)
        self.value = nn.Linear(key_dim, value_dim)
        self.scale = attention_dim ** -0.5

    def forward(self, query: Tensor, keys: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Nq, query_dim), (B, Nk, key_dim), (B, Nk) bool →
        output (B, Nq, value_dim) and weights (B, Nq, Nk); zero output where a row has no key."""
        scores = self.query(query) @ self.key(keys).transpose(1, 2) * self.scale
        weights = _masked_softmax(scores, key_mask[:, None, :])
        return weights @ self.value(keys), weights


class GatedAttentionPool(nn.Module):
    """Gated attention-MIL pooling (Ilse et al. 2018): a = wᵀ(tanh(V h) ⊙ σ(U h))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.tanh_branch = nn.Linear(dim, dim)
        self.gate_branch = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, dim), (B, N) → pooled (B, dim) and weights (B, N) (0 on padding; a patient
        with no token gets a zero vector and zero weights)."""
        hidden = torch.tanh(self.tanh_branch(tokens)) * torch.sigmoid(self.gate_branch(tokens))
        weights = _masked_softmax(self.score(hidden).squeeze(-1), mask)
        return (weights[..., None] * tokens).sum(1), weights


class Contextualised(NamedTuple):
    """Query tokens after intramodality attention."""

    tokens: Tensor  # (B, N_query, d_model)
    mask: Tensor  # (B, N_query) bool
    key_attention: Tensor | None  # (B, N_query, N_keys), None when the modality has no keys


class ModalityBranch(nn.Module):
    """One imaging modality: its families' tokens → one vector per patient.

    Parameters
    ----------
    modality : str
        "wsi" or "us".
    config : FusionConfig
    """

    def __init__(self, modality: str, config: FusionConfig) -> None:
        super().__init__()
        d_model = config.d_model
        self.modality = modality
        self.query_family = config.queries[modality]
        self.key_families = tuple(f for f in config.modality_families(modality)
                                  if f != self.query_family)
        self.encoders = nn.ModuleDict({
            family: FamilyEncoder(config.family_dims[family], d_model,
                                  config.token_slots.get(family), config.input_components)
            for family in (self.query_family, *self.key_families)})
        positioned = any(POSITIONED_FAMILIES.get(f) == modality for f in self.encoders)
        self.position = (PositionEncoding(POSITION_SCALES[modality], d_model)
                         if config.positional_encoding and positioned else None)
        if self.key_families:
            self.family_type = nn.Parameter(
                torch.randn(len(self.key_families), d_model) * _EMBEDDING_INIT_STD)
            self.attention = CrossAttention(d_model, d_model, d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pool = GatedAttentionPool(d_model)
        self.missing = nn.Parameter(torch.zeros(d_model))
        self.align = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU())

    def embed(self, family: str, batch: Batch) -> tuple[Tensor, Tensor]:
        """Projected tokens (B, N, d_model) of one family, position code added; its mask."""
        raw, mask = batch.families[family].tokens, batch.families[family].mask
        encoder = self.encoders[family]
        assert isinstance(encoder, FamilyEncoder)
        if encoder.slots and raw.shape[1] != encoder.slots:
            # No patient of this batch has the family (checked): padding was sized to nothing.
            raw = raw.new_zeros(raw.shape[0], encoder.slots, raw.shape[2])
            mask = mask.new_zeros(raw.shape[:2])
        tokens = encoder(raw)
        if self.position is not None and POSITIONED_FAMILIES.get(family) == self.modality:
            tokens = tokens + self.position(batch.positions[self.modality], mask)
        return tokens, mask

    def contextualise(self, batch: Batch) -> Contextualised:
        """Intramodality attention: the query family attends to the other families' tokens."""
        query, query_mask = self.embed(self.query_family, batch)
        if not self.key_families:
            return Contextualised(self.norm(query), query_mask, None)
        keys, key_masks = [], []
        for index, family in enumerate(self.key_families):
            tokens, mask = self.embed(family, batch)
            keys.append(tokens + self.family_type[index])
            key_masks.append(mask)
        attended, weights = self.attention(query, torch.cat(keys, 1), torch.cat(key_masks, 1))
        return Contextualised(self.norm(query + attended), query_mask, weights)

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Pooled vector (B, d_model), patch attention (B, N_query), presence (B,) bool."""
        context = self.contextualise(batch)
        pooled, attention = self.pool(context.tokens, context.mask)
        present = batch.present[self.modality].to(pooled.device) & context.mask.any(1)
        return pooled, attention, present


class ClinicalTokens(nn.Module):
    """One ``clinical_dim`` token per clinical variable.

    Continuous: ``nn.Linear(1, clinical_dim)`` on the standardised value, a learned token when
    missing. Categorical: ``nn.Embedding(n_levels + 1, clinical_dim)``, index n_levels = missing.
    Buffers ``mean``/``std``: (n_continuous,) from :meth:`fit`.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, spec: ClinicalSpec, clinical_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.continuous_columns = [i for i, (_, kind, _) in enumerate(spec)
                                   if kind == "continuous"]
        self.categorical_columns = [i for i, (_, kind, _) in enumerate(spec)
                                    if kind == "categorical"]
        n_continuous = len(self.continuous_columns)
        self.continuous = nn.ModuleList(nn.Linear(1, clinical_dim)
                                        for _ in self.continuous_columns)
        self.continuous_missing = nn.Parameter(torch.randn(n_continuous, clinical_dim))
        self.categorical = nn.ModuleList(nn.Embedding(int(spec[i][2]) + 1, clinical_dim)
                                         for i in self.categorical_columns)
        self.register_buffer("mean", torch.zeros(n_continuous))
        self.register_buffer("std", torch.ones(n_continuous))

    @torch.no_grad()
    def fit(self, values: Tensor, missing: Tensor) -> None:
        """Mean/std of each continuous variable over the patients where it is not missing."""
        for slot, column in enumerate(self.continuous_columns):
            observed = values[~missing[:, column], column].to(torch.float64)
            if observed.numel() == 0:
                raise ValueError(f"fit_normalisation: clinical variable {self.spec[column][0]!r}"
                                 " is missing for every patient; remove it from the spec")
            mean, std = observed.mean(), observed.std(unbiased=False)
            self.mean[slot] = mean
            self.std[slot] = std if std > 1e-8 * max(1.0, abs(float(mean))) else 1.0

    def check(self, values: Tensor, missing: Tensor) -> None:
        """Raise ValueError for a non-finite value or a level outside 0 … n_levels − 1."""
        for column, (name, kind, levels) in enumerate(self.spec):
            observed = values[~missing[:, column], column]
            if not torch.isfinite(observed).all():
                raise ValueError(f"clinical {name!r}: non-finite value not flagged missing")
            if kind == "categorical" and (
                    (observed != observed.round()).any() or (observed < 0).any()
                    or (observed >= levels).any()):
                raise ValueError(f"clinical {name!r}: level indices must be integers in "
                                 f"0 … {levels - 1}, got {sorted(set(observed.tolist()))}")

    def forward(self, values: Tensor, missing: Tensor) -> Tensor:
        """(B, V) values, (B, V) bool missing → (B, V, clinical_dim) tokens."""
        # Missing entries may hold anything (NaN included); zero them so no gradient sees them.
        values = torch.where(missing, torch.zeros_like(values), values).to(self.mean.dtype)
        tokens: list[Tensor | None] = [None] * len(self.spec)
        for slot, (column, linear) in enumerate(zip(self.continuous_columns, self.continuous,
                                                    strict=True)):
            standardised = (values[:, column:column + 1] - self.mean[slot]) / self.std[slot]
            tokens[column] = torch.where(missing[:, column, None], self.continuous_missing[slot],
                                         linear(standardised))
        for column, embedding in zip(self.categorical_columns, self.categorical, strict=True):
            index = torch.where(missing[:, column], int(self.spec[column][2]),
                                values[:, column].round().long())
            tokens[column] = embedding(index)
        return torch.stack([t for t in tokens if t is not None], dim=1)


class ClinicalFusion(nn.Module):
    """F_inter meets the clinical tokens according to the fusion strategy.

    Parameters
    ----------
    strategy : FusionStrategy
    inter_dim : int
        Width of F_inter.
    clinical_dim : int
        Width of a clinical token.
    attention_dim : int
        Width of the space where F_inter meets the clinical tokens (cross-attention).
    """

    def __init__(self, strategy: FusionStrategy, inter_dim: int, clinical_dim: int,
                 attention_dim: int) -> None:
        super().__init__()
        self.strategy = strategy
        self.out_dim = 2 * inter_dim if strategy == "concat" else inter_dim
        if strategy == "cross-attention":
            self.attention = CrossAttention(inter_dim, clinical_dim, attention_dim, inter_dim)
        else:
            self.summary = nn.Linear(clinical_dim, inter_dim)

    def forward(self, inter: Tensor, clinical: Tensor) -> tuple[Tensor, Tensor]:
        """(B, inter_dim), (B, V, clinical_dim) → fused (B, out_dim), attention (B, V)."""
        n_patients, n_variables = clinical.shape[:2]
        if self.strategy == "cross-attention":
            every = torch.ones(n_patients, n_variables, dtype=torch.bool, device=clinical.device)
            attended, weights = self.attention(inter[:, None, :], clinical, every)
            return inter + attended[:, 0], weights[:, 0]
        summary = self.summary(clinical.mean(1))
        uniform = torch.full((n_patients, n_variables), 1.0 / n_variables,
                             dtype=inter.dtype, device=inter.device)
        if self.strategy == "concat":
            return torch.cat([inter, summary], dim=1), uniform
        if self.strategy == "add":
            return inter + summary, uniform
        return inter * summary, uniform


class MrrpFusion(nn.Module):
    """The MRRP multimodal recurrence-risk network (see the module docstring).

    Parameters
    ----------
    config : FusionConfig

    Notes
    -----
    Call :meth:`fit_normalisation` on the training data before training; the fitted statistics
    are buffers of ``state_dict``. Per-patient computation only (no batch statistics), so in
    eval mode a patient's risk does not depend on the other patients of the batch.
    """

    normalisation_fitted: Tensor

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.branches = nn.ModuleDict({m: ModalityBranch(m, config) for m in config.modalities})
        self.clinical = ClinicalTokens(config.clinical, config.clinical_dim)
        self.fusion = ClinicalFusion(config.fusion, config.d_model * len(config.modalities),
                                     config.clinical_dim, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.fusion.out_dim, 1, bias=False)
        self.register_buffer("normalisation_fitted", torch.tensor(False))

    @torch.no_grad()
    def fit_normalisation(self, batch: Batch) -> None:
        """Fit the input standardisation on training data (padding and missing values excluded).

        Parameters
        ----------
        batch : Batch
            The training patients (all of them, in one batch: only statistics are computed).

        Raises
        ------
        ValueError
            A used family has no real token, or a continuous variable is missing for everyone.
        """
        self._check_batch(batch)
        for modality, branch in self.branches.items():
            assert isinstance(branch, ModalityBranch)
            if modality in self.config.compensated:
                continue  # no data at all: the branch stays unfitted and unused
            for family, encoder in branch.encoders.items():
                given = batch.families[family]
                assert isinstance(encoder, FamilyEncoder)
                encoder.fit(given.tokens, given.mask, family)
        self.clinical.fit(batch.clinical_values, batch.clinical_missing)
        self.normalisation_fitted.fill_(True)

    def forward(self, batch: Batch) -> FusionOutput:
        """Risk, clinical attention and patch attention of B patients.

        Raises
        ------
        RuntimeError
            The normalisation was never fitted (nor loaded with a ``state_dict``).
        ValueError
            The batch does not match the configuration (the message names the input).
        """
        if not bool(self.normalisation_fitted):
            raise RuntimeError("MrrpFusion: call fit_normalisation on the training data (or load"
                               " a trained state_dict) before forward")
        self._check_batch(batch)
        pooled, attention, present = {}, {}, {}
        n = batch.clinical_values.shape[0]
        for modality, branch in self.branches.items():
            if modality in self.config.compensated:
                query = batch.families[self.config.queries[modality]].mask
                pooled[modality] = batch.clinical_values.new_zeros(n, self.config.d_model)
                attention[modality] = query.new_zeros(query.shape, dtype=torch.float32)
                present[modality] = query.new_zeros(n)
                continue
            pooled[modality], attention[modality], present[modality] = branch(batch)
        if self.training and self.config.modality_dropout > 0:
            present = self._drop_modalities(present)
        aligned = []
        for modality, branch in self.branches.items():
            assert isinstance(branch, ModalityBranch)
            absent = (branch.missing if self.config.missing == "learned"
                      else torch.zeros_like(branch.missing))
            vector = torch.where(present[modality][:, None], pooled[modality], absent)
            attention[modality] = attention[modality] * present[modality][:, None]
            aligned.append(branch.align(vector))
        inter = torch.cat(aligned, dim=1)
        clinical = self.clinical(batch.clinical_values, batch.clinical_missing)
        fused, clinical_attention = self.fusion(inter, clinical)
        risk = self.head(self.dropout(fused)).squeeze(-1)
        return FusionOutput(risk, clinical_attention, attention)

    def _drop_modalities(self, present: dict[str, Tensor]) -> dict[str, Tensor]:
        stacked = torch.stack([present[m] for m in self.branches], dim=1)  # (B, M)
        drop = stacked & (torch.rand(stacked.shape, device=stacked.device)
                          < self.config.modality_dropout)
        emptied = stacked.any(1) & ~(stacked & ~drop).any(1)
        # Restore one dropped modality, chosen uniformly, for patients who would have none.
        choice = torch.rand(stacked.shape, device=stacked.device).masked_fill(~drop, -1.0)
        restore = nn.functional.one_hot(choice.argmax(1), stacked.shape[1]).bool()
        kept = (stacked & ~drop) | (restore & emptied[:, None])
        return {m: kept[:, i] for i, m in enumerate(self.branches)}

    def _check_batch(self, batch: Batch) -> None:
        n_patients = batch.clinical_values.shape[0]
        dims = self.config.family_dims
        slots = self.config.token_slots
        for family in self.config.used_families:
            given = batch.families.get(family)
            if given is None:
                raise ValueError(f"batch: family {family!r} is missing (the model uses it; "
                                 "pass an all-False mask for patients without it)")
            tokens, mask = given.tokens, given.mask
            if tokens.ndim != 3 or tokens.shape[0] != n_patients or tokens.shape[2] != dims[family]:
                raise ValueError(f"batch: {family!r} tokens have shape {tuple(tokens.shape)}; "
                                 f"expected ({n_patients}, N, {dims[family]})")
            if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
                raise ValueError(f"batch: {family!r} mask must be bool of shape "
                                 f"{tuple(tokens.shape[:2])}, got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
            if family in slots and tokens.shape[1] != slots[family] and mask.any():
                raise ValueError(f"batch: {family!r} has {tokens.shape[1]} tokens; the model "
                                 f"expects its {slots[family]} slots")
            source = POSITIONED_FAMILIES.get(family)
            if self.config.positional_encoding and source is not None:
                positions = batch.positions.get(source)
                if positions is None or positions.shape != (*tokens.shape[:2], 2):
                    got = None if positions is None else tuple(positions.shape)
                    raise ValueError(f"batch: positions[{source!r}] must be "
                                     f"{(*tokens.shape[:2], 2)} for {family!r}, got {got}")
        for modality in self.config.modalities:
            present = batch.present.get(modality)
            if present is None or present.shape != (n_patients,) or present.dtype != torch.bool:
                raise ValueError(f"batch: present[{modality!r}] must be a ({n_patients},) bool "
                                 "tensor")
        expected = (n_patients, len(self.config.clinical))
        if (batch.clinical_values.shape != expected or batch.clinical_missing.shape != expected
                or batch.clinical_missing.dtype != torch.bool):
            raise ValueError(f"batch: clinical_values and clinical_missing (bool) must be "
                             f"{expected}, got {tuple(batch.clinical_values.shape)} and "
                             f"{tuple(batch.clinical_missing.shape)} "
                             f"{batch.clinical_missing.dtype}")
        self.clinical.check(batch.clinical_values, batch.clinical_missing)
