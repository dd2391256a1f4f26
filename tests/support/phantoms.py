"""Phantom specifications shared by tests (small: seconds to write)."""

from mrrp_pacs.phantom.generator import PhantomSpec

SMALL = PhantomSpec(patients=6, seed=3, slide_px=1024, missing_wsi=0.3, missing_us=0.3,
                    missing_report=0.3)
