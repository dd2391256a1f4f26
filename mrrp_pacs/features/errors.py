"""The one error type of feature extraction."""


class FeatureError(ValueError):
    """An input that cannot be turned into features; the message names it and says why."""


class ModelUnavailable(FeatureError):
    """A model every patient needs cannot be loaded (missing weights, bad configuration)."""
