"""Versioned model registry (weights + manifest with provenance and hashes). Nothing is here
yet: the registry arrives with the model issue."""
