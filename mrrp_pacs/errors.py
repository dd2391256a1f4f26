"""Every error a user can act on, in one place (as wsidicom keeps its ``errors.py``).

Each derives from :class:`MrrpError`, whose message says what was wrong, with which file,
message, UID or key, and what to do; the command line turns any ``MrrpError`` into that one
message and an exit status, while any other exception (a bug, or a library's ``ValueError``)
keeps its traceback. The typed fields let a caller act without parsing the text.

Messages and fields never hold patient identifiers: they end up in logs and job rows.

This module imports nothing, so every package may import it: ``model_store`` too, which
otherwise imports nothing of the others. Several errors also derive from the built-in a
caller of their module has always been able to catch (``ValueError``, ``RuntimeError``).
"""

from __future__ import annotations


class MrrpError(Exception):
    """An error a user can act on; the message says what was wrong and what to do.

    Parameters
    ----------
    message
        For the user: what, where, what to do.
    source
        The file, message, peer or configuration source it concerns, when one does.
    uid
        The DICOM UID or HL7 control id it concerns, when one does.
    key
        The configuration key, feature family or model label it concerns, when one does.
    """

    def __init__(self, message: str, *, source: str | None = None, uid: str | None = None,
                 key: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.uid = uid
        self.key = key


# -- configuration and state ------------------------------------------------------------------

class ConfigError(MrrpError, ValueError):
    """A configuration file, key or value that cannot be used (``key``, ``source``)."""


class SchemaError(MrrpError, RuntimeError):
    """The database schema cannot be used by this version of mrrp-pacs (``source``: the file)."""


class StateLocked(MrrpError, RuntimeError):
    """Another process holds the state folder's lock (``source``: the lock file); the message
    names its pid. The command line exits with status 75 (``EX_TEMPFAIL``)."""


class ModelStoreError(MrrpError, RuntimeError):
    """A model that is missing, incomplete or altered (``key``: its label, when known)."""


# -- what arrives ------------------------------------------------------------------------------

class DicomError(MrrpError, ValueError):
    """A file that looks like DICOM but cannot be used; the message says why."""


class Hl7Error(MrrpError, ValueError):
    """Content that is not a usable HL7 v2 message; the message says why (fit for an AE)."""


class SidecarError(MrrpError, ValueError):
    """A file that looks like a region sidecar (ASAP, GeoJSON, Pascal VOC) but cannot be used."""


class PullError(MrrpError, RuntimeError):
    """A step of a PACS poll that failed; the message says which and what to check."""


# -- features, model, results --------------------------------------------------------------------

class FeatureError(MrrpError, ValueError):
    """An input that cannot be turned into features (``key``: the family)."""


class ModelUnavailable(FeatureError):
    """A model every patient needs cannot be loaded (missing weights, bad configuration)."""


class CohortError(MrrpError, ValueError):
    """Training or evaluation data that cannot be used (outcomes, table, too few events)."""


class MetricUndefined(MrrpError, ValueError):
    """A metric that has no value on these data (no event, horizon past follow-up, …)."""


class SendError(MrrpError):
    """A send that did not deliver.

    Parameters
    ----------
    reason
        What happened, readable by an operator; stored as ``last_error``. It must hold no
        patient identifiers: status codes, exception classes, AE titles, hosts and ports.
    transient
        True when the same send may succeed later (peer down, busy, out of resources); False
        when it will not (the peer cannot understand the object), so the row goes ``dead`` at once.
    """

    def __init__(self, reason: str, *, transient: bool, source: str | None = None) -> None:
        super().__init__(reason, source=source)
        self.reason = reason
        self.transient = transient


# -- the demo and its private PACS ---------------------------------------------------------------

class OrthancUnavailable(MrrpError, RuntimeError):
    """Orthanc is not installed, or did not start (the message says which and where to look)."""


class DemoError(MrrpError, RuntimeError):
    """The demo cannot go on; the message says which step and why."""
