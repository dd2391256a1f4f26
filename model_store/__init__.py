"""Versioned model registry: weights + manifest with provenance and SHA-256 of every file; the
manifest's own SHA-256 beside it.

Its errors are :class:`mrrp_pacs.errors.ModelStoreError`.
"""

from model_store.registry import Located, ModelStore, ModelVersion, locate

__all__ = ["Located", "ModelStore", "ModelVersion", "locate"]
