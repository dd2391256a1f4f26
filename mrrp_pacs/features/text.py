"""Ultrasound report text: the findings section, embedded token by token with a BERT-family model.

Two steps. :func:`findings` cuts the findings section (and the impression that follows it) out
of the free-text report with configurable regular expressions. A :class:`TextEncoder`, built by
:func:`build_text_encoder` from the registry ``mrrp_pacs/data/text_encoders.toml``, turns that text
into one embedding per token, the last hidden state of the model; the fusion model attends over
these token embeddings.

What gets embedded is the findings text followed by the impression. The impression carries the
BI-RADS assessment category, the radiologist's weighing of the listed descriptors into one degree
of suspicion. In the phantom (``mrrp_pacs/phantom/messages.py``) the category sums the margin,
shadowing and vascularity readings behind the findings' words with a second, independent reading
of the orientation trait, so it holds signal the findings' words alone do not.

Models are read only from local folders (``local_files_only=True``): a name is never looked up on
the Hugging Face Hub and nothing is downloaded. Each model folder is loaded once per process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from mrrp_pacs.config import read_data_toml
from mrrp_pacs.errors import ConfigError, FeatureError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LOGGER = logging.getLogger(__name__)

TEXT_FEATURES_VERSION = "1"  # bump when extraction or token handling changes what is embedded

# Pieces of the default patterns. A heading starts a line (or follows a sentence end, for
# reports flattened onto one line) and ends with a colon or the end of its line, so prose such
# as "Findings are consistent with ..." is not taken for a heading.
_HEADING_START = r"(?:^|(?<=[.;。]))[ \t]*"
_HEADING_END = r"[ \t]*(?:[:：]|$)"
_FINDINGS_WORD = r"(?:findings?|results?|befunde?)"
_FINDINGS_HEADING = (
    rf"(?:(?:(?:sonographic|ultrasound)[ \t]+)?{_FINDINGS_WORD}"
    rf"(?:[ \t]*/[ \t]*{_FINDINGS_WORD})?|超声所见|检查所见)"
)
_IMPRESSION_HEADING = (
    r"(?:impressions?|conclusions?|assessment|opinion|beurteilung|超声提示|超声诊断|诊断意见|印象)"
)
# The impression runs to the first blank line, which in practice ends it before sign-off lines.
_IMPRESSION = (
    rf"{_HEADING_START}{_IMPRESSION_HEADING}{_HEADING_END}\s*(?P<impression>.+?)"
    r"(?:\n[ \t]*\n|\Z)"
)

DEFAULT_PATTERNS: tuple[str, ...] = (
    # A findings heading (FINDINGS:, Findings, FINDINGS/RESULT:, Ultrasound findings:, Befund:,
    # 超声所见:), its text up to an impression heading or the end, then the impression if any.
    rf"{_HEADING_START}{_FINDINGS_HEADING}{_HEADING_END}\s*(?P<findings>.*?)\s*(?:{_IMPRESSION}|\Z)",
    # No findings heading: every line before an Impression/Conclusion/Assessment heading.
    rf"\A\s*(?P<findings>.+?)\s*{_IMPRESSION}",
)
"""Default findings patterns, tried in order; see :class:`FindingsExtractor` for the rules."""

_DEFAULT_PATTERNS_DESCRIPTION = (
    "a findings heading (FINDINGS:, FINDINGS/RESULT:, Ultrasound findings:, Befund:, 超声所见:) "
    "or text before an impression heading (IMPRESSION:, CONCLUSION:, ASSESSMENT:, OPINION:, "
    "Beurteilung:, 超声提示:), headings at a line start and ending in a colon or the line")

PATTERN_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL


@dataclass(frozen=True)
class ReportFindings:
    """The parts of a report that are embedded."""

    findings: str
    impression: str  # "" when the report (or the pattern) has no impression

    @property
    def text(self) -> str:
        """The findings, then the impression on a new line: the text to embed."""
        return f"{self.findings}\n{self.impression}" if self.impression else self.findings


class FindingsExtractor:
    """Finds the findings section of a free-text report with regular expressions.

    Parameters
    ----------
    patterns
        Regular expressions tried in order; the first that matches decides. Each must have a
        named group ``findings`` and may have one named ``impression``. They are compiled
        case-insensitive, multi-line (``^``/``$`` match at line ends) and dot-all (``.``
        matches a newline).

    Raises
    ------
    ValueError
        A pattern does not compile or lacks the ``findings`` group; the message names it.
    """

    def __init__(self, patterns: Sequence[str] = DEFAULT_PATTERNS) -> None:
        if isinstance(patterns, str):
            raise ValueError("findings patterns must be a list of regular expressions, not one "
                             "string")
        if not patterns:
            raise ValueError("findings patterns: the list is empty")
        compiled = []
        for i, pattern in enumerate(patterns):
            try:
                regex = re.compile(pattern, PATTERN_FLAGS)
            except re.error as exc:
                raise ValueError(f"findings pattern {i} {pattern!r} is not a valid regular "
                                 f"expression: {exc}") from None
            if "findings" not in regex.groupindex:
                raise ValueError(f"findings pattern {i} {pattern!r} has no (?P<findings>...) "
                                 "group")
            compiled.append(regex)
        self.patterns: tuple[str, ...] = tuple(patterns)
        self._compiled = tuple(compiled)

    def extract(self, report_text: str, source: str = "report") -> ReportFindings:
        """Findings and impression of one report.

        Parameters
        ----------
        report_text
            The whole report; lines may end in ``\\n``, ``\\r\\n`` or ``\\r``.
        source
            Names the report in error messages (e.g. ``"report row 12"``); never put patient
            identifiers here.

        Raises
        ------
        FeatureError
            No pattern matches, or the matching pattern's findings text is empty.
        """
        text = report_text.replace("\r\n", "\n").replace("\r", "\n")
        for i, regex in enumerate(self._compiled):
            match = regex.search(text)
            if match is None:
                continue
            found = (match.group("findings") or "").strip()
            if not found:
                raise FeatureError(f"{source}: the findings section is empty (findings "
                                   f"pattern {i} matched an empty section)")
            impression = ""
            if "impression" in regex.groupindex:
                impression = (match.group("impression") or "").strip()
            return ReportFindings(found, impression)
        looked_for = (_DEFAULT_PATTERNS_DESCRIPTION if self.patterns == DEFAULT_PATTERNS
                      else f"any of the patterns {list(self.patterns)!r}")
        raise FeatureError(f"{source}: no findings section; looked for {looked_for}; add a "
                           "pattern for this report layout to the configured findings patterns")


@lru_cache(maxsize=8)
def _extractor(patterns: tuple[str, ...]) -> FindingsExtractor:
    return FindingsExtractor(patterns)


def findings(report_text: str, patterns: Sequence[str] = DEFAULT_PATTERNS,
             source: str = "report") -> str:
    """The text of a report to embed: its findings, then its impression (see module docstring).

    Parameters
    ----------
    report_text
        The whole report.
    patterns
        Regular expressions as for :class:`FindingsExtractor`.
    source
        Names the report in error messages (e.g. ``"report row 12"``).

    Raises
    ------
    FeatureError
        The report has no (or an empty) findings section.
    """
    return _extractor(tuple(patterns)).extract(report_text, source).text


# ----------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class TextEncoderSpec:
    """One registry entry (``mrrp_pacs/data/text_encoders.toml`` documents the fields)."""

    name: str
    kind: Literal["package", "directory"]
    dim: int
    package: str = ""
    subdirectory: str = ""
    description: str = ""


def load_text_encoder_registry(path: Path | None = None) -> dict[str, TextEncoderSpec]:
    """Read the text encoder registry (default: the built-in one).

    Raises
    ------
    ConfigError
        The file is unreadable or an entry is malformed; the message names file and key.
    """
    raw, source = read_data_toml(path, "text_encoders.toml", "text encoder registry")
    specs = {}
    for name, entry in raw.items():
        where = f"{source}: [{name}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not a table")
        unknown = set(entry) - {"kind", "dim", "package", "subdirectory", "description"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        kind = entry.get("kind")
        if kind not in ("package", "directory"):
            raise ConfigError(f"{where}.kind = {kind!r}: expected 'package' or 'directory'")
        dim = entry.get("dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ConfigError(f"{where}.dim = {dim!r}: expected a positive integer")
        package = str(entry.get("package", ""))
        if kind == "package" and not package:
            raise ConfigError(f"{where}: kind 'package' needs package = '<import name>'")
        specs[name] = TextEncoderSpec(name, kind, dim, package,
                                      str(entry.get("subdirectory", "")),
                                      str(entry.get("description", "")))
    if not specs:
        raise ConfigError(f"{source} defines no text encoder")
    return specs


# Files that decide what a model folder computes, besides its weights; hashed into the version.
_DEFINITION_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                     "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                     "spiece.model", "sentencepiece.bpe.model")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")


@dataclass(frozen=True)
class _LoadedModel:
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    digest: str  # sha256 over weights and definition files


_LOADED: dict[Path, _LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


class TextEncoder:
    """A loaded BERT-family model that embeds report text token by token.

    Made by :func:`build_text_encoder`; encoders of one model folder share the loaded model.

    Attributes
    ----------
    name
        Registry name, e.g. ``"minilm"``.
    version
        ``"<TEXT_FEATURES_VERSION>+<16 hex digits>"``: the hex digits are the start of a
        SHA-256 over the weight files, ``config.json`` and the tokenizer files, so the version
        changes whenever the model's output can.
    dim
        Width of each token embedding (the model's hidden size).
    directory
        The model folder it was loaded from.
    max_positions
        The longest input the model accepts, special tokens included (tokens).
    """

    def __init__(self, name: str, directory: Path, loaded: _LoadedModel) -> None:
        self.name = name
        self.directory = directory
        self.version = f"{TEXT_FEATURES_VERSION}+{loaded.digest[:16]}"
        self.dim = int(loaded.model.config.hidden_size)
        self.max_positions = int(loaded.model.config.max_position_embeddings)
        self._tokenizer = loaded.tokenizer
        self._model = loaded.model

    def embed(self, text: str, max_tokens: int = 256) -> np.ndarray:
        """Token embeddings of ``text``: the model's last hidden state.

        The text is tokenised as the model was trained, with its special tokens (for BERT
        ``[CLS]`` first and ``[SEP]`` last), and every row is kept, special tokens included:
        the rows are exactly the sequence the model saw, ``[CLS]`` gives the fusion model a
        summary slot, and their mean is the sentence-transformers mean pooling. One text is
        encoded alone, so there is no padding. A longer text is cut at the end (for BERT,
        ``[CLS]``, the first ``max_tokens - 2`` word pieces, ``[SEP]``) and a warning is logged;
        the impression, last in :func:`findings`, is what is lost first.

        Parameters
        ----------
        text
            The text to embed, usually :func:`findings` of a report.
        max_tokens
            Most rows returned, special tokens included; at least 3. The model's own limit
            :attr:`max_positions` applies when it is smaller.

        Returns
        -------
        numpy.ndarray
            (n_tokens, dim) float32, n_tokens ≤ min(``max_tokens``, :attr:`max_positions`).
            Deterministic on CPU for a given torch build and thread count.

        Raises
        ------
        FeatureError
            ``text`` is empty or only whitespace.
        ValueError
            ``max_tokens`` is below 3.
        """
        import torch  # here, not at import: findings() alone must not pay for torch

        if max_tokens < 3:
            raise ValueError(f"max_tokens = {max_tokens}: at least 3 (two special tokens and "
                             "one of text)")
        max_tokens = min(max_tokens, self.max_positions)
        if not text.strip():
            raise FeatureError(f"text encoder {self.name!r}: the text to embed is empty")
        # verbose=False: a text longer than the model takes is expected here; it is cut below
        n_full = len(self._tokenizer(text, verbose=False)["input_ids"])
        if n_full > max_tokens:
            LOGGER.warning("text encoder %s: text of %d tokens truncated to %d", self.name,
                           n_full, max_tokens)
        encoded = self._tokenizer(text, truncation=True, max_length=max_tokens,
                                  return_tensors="pt")
        with torch.inference_mode():
            hidden = self._model(**encoded).last_hidden_state[0]
        return hidden.to(torch.float32).numpy()

    def embed_pooled(self, text: str, max_tokens: int = 256) -> np.ndarray:
        """Mean of :meth:`embed` over its rows: a (dim,) float32 text embedding.

        For ``minilm`` this is the sentence-transformers embedding before its L2
        normalisation; compare pooled embeddings by cosine similarity.
        """
        return self.embed(text, max_tokens).mean(axis=0)


def build_text_encoder(name: str = "minilm", paths: Mapping[str, Path] | None = None,
                       registry: Path | None = None) -> TextEncoder:
    """The text encoder called ``name``, loaded once per process and model folder.

    Parameters
    ----------
    name
        A registry entry, e.g. ``"minilm"`` (the default) or ``"bert-large"``.
    paths
        Local model folders by encoder name; required for ``kind = "directory"`` entries and
        used, when given, instead of a ``kind = "package"`` entry's installed folder.
    registry
        Registry file (default: ``mrrp_pacs/data/text_encoders.toml``).

    Raises
    ------
    ConfigError
        ``name`` is not in the registry, or the registry is malformed.
    FeatureError
        The model folder is missing, incomplete or unreadable, or the model's hidden size is not
        the registry's ``dim``; the message names the folder and what to do.
    """
    spec, directory = _locate(name, paths, registry)
    with _LOAD_LOCK:
        loaded = _LOADED.get(directory)
        if loaded is None:
            loaded = _load(spec.name, directory)
            _LOADED[directory] = loaded
    encoder = TextEncoder(name, directory, loaded)
    if encoder.dim != spec.dim:
        raise FeatureError(
            f"text encoder {name!r}: the model in {directory} has hidden size {encoder.dim}, the "
            f"registry says dim = {spec.dim}; point {name!r} at the right folder or fix the "
            "registry entry")
    return encoder


def _model_directory(spec: TextEncoderSpec, paths: Mapping[str, Path]) -> Path:
    if spec.name in paths:
        return Path(paths[spec.name]).expanduser().resolve()
    if spec.kind == "directory":
        raise FeatureError(
            f"text encoder {spec.name!r} ({spec.description}) has no local folder: give its path "
            "in the configuration (a folder with config.json, the weights and the tokenizer "
            "files); models are never downloaded")
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FeatureError(
            f"text encoder {spec.name!r}: Python package {spec.package!r} is not installed; "
            "install the project's dependencies (pip install -e .) or give a local model folder "
            f"for {spec.name!r} in the configuration")
    return (Path(next(iter(found.submodule_search_locations))) / spec.subdirectory).resolve()


def _load(name: str, directory: Path) -> _LoadedModel:
    if not directory.is_dir():
        raise FeatureError(f"text encoder {name!r}: model folder {directory} does not exist; "
                           "give the folder holding config.json, the weights and the tokenizer")
    weights = _weight_files(directory)
    missing = [label for label, present in (
        ("config.json", (directory / "config.json").is_file()),
        ("weights (*.safetensors or pytorch_model.bin)", bool(weights)),
        (f"a tokenizer ({' or '.join(_TOKENIZER_FILES)})",
         any((directory / f).is_file() for f in _TOKENIZER_FILES)),
    ) if not present]
    if missing:
        raise FeatureError(f"text encoder {name!r}: {directory} is not a complete Hugging Face "
                           f"model folder, it lacks {', '.join(missing)}; save the model there "
                           "with save_pretrained() for both model and tokenizer")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A progress bar per load would litter the daemon's log; restored for other users after.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModel.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers, tokenizers and safetensors raise many types
        raise FeatureError(f"text encoder {name!r}: cannot load the model in {directory}: "
                           f"{type(exc).__name__}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise FeatureError(f"text encoder {name!r}: the tokenizer in {directory} has "
                           f"{len(tokenizer)} tokens but the model only {vocab_size}; the "
                           "tokenizer files belong to another model")
    model.eval()
    digest = _folder_digest(directory, weights)
    LOGGER.info("text encoder %s loaded from %s (sha256 %s)", name, directory, digest[:16])
    return _LoadedModel(tokenizer, model, digest)


def text_encoder_version(name: str = "minilm", paths: Mapping[str, Path] | None = None,
                         registry: Path | None = None) -> str:
    """The :attr:`TextEncoder.version` of ``name`` without loading the model (hashes its files).

    Lets the feature cache decide that nothing needs computing without paying for a load.
    """
    _, directory = _locate(name, paths, registry)
    weights = _weight_files(directory) if directory.is_dir() else []
    if not weights:
        raise FeatureError(f"text encoder {name!r}: no weights in {directory}")
    return f"{TEXT_FEATURES_VERSION}+{_folder_digest(directory, weights)[:16]}"


def _locate(name: str, paths: Mapping[str, Path] | None, registry: Path | None
            ) -> tuple[TextEncoderSpec, Path]:
    """The registry entry ``name`` and the model folder it points to."""
    specs = load_text_encoder_registry(registry)
    spec = specs.get(name)
    if spec is None:
        raise ConfigError(f"text encoder {name!r} is not in the registry "
                          f"({registry or 'built-in'}); known: {sorted(specs)}")
    return spec, _model_directory(spec, paths or {})


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))


def _folder_digest(directory: Path, weights: list[Path]) -> str:
    files = weights + [directory / f for f in _DEFINITION_FILES if (directory / f).is_file()]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
