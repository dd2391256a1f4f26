"""Versioned model registry: weights + manifest with provenance and SHA-256 of every file."""

from model_store.registry import ModelStore, ModelStoreError, ModelVersion

__all__ = ["ModelStore", "ModelStoreError", "ModelVersion"]
