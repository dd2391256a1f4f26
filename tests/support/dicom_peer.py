"""A pynetdicom sender for storage SCP tests: one association, one object."""

from __future__ import annotations

from orthanc import LOOPBACK
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundImageStorage


def store_one(port: int, ds: Dataset, calling: str = "MRRPTEST", called: str = "MRRP") -> Dataset:
    """C-STORE ``ds`` (an ultrasound image) to 127.0.0.1:``port`` on its own association;
    the status data set (empty when the association was aborted)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(UltrasoundImageStorage)
    assoc = ae.associate(LOOPBACK, port, ae_title=called)
    assert assoc.is_established, f"{calling} -> {called} on port {port} was not accepted"
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()
