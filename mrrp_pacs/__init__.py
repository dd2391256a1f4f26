"""mrrp-pacs: multimodal recurrence-risk prediction for HR+/HER2- early breast cancer."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mrrp-pacs")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"
