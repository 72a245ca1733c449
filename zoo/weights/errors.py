"""Errors raised while finding, downloading, reading and merging pretrained weights.

All derive from `WeightsError`, so a caller can catch every weights problem at once.
"""


class WeightsError(Exception):
    """Base class of every error about pretrained weights."""


class UnsafeCheckpointError(WeightsError):
    """A pickle asked for a global outside the allow-list (it is not a plain state dict)."""


class CorruptCheckpointError(WeightsError):
    """A checkpoint file is truncated, malformed, or holds no arrays."""


class ChecksumError(WeightsError):
    """A file's sha256 differs from the expected digest."""


class DownloadError(WeightsError):
    """A download failed (network error, HTTP error, truncated body)."""


class OfflineError(WeightsError):
    """Offline mode is on and the file is not in the cache."""


class WeightsMismatchError(WeightsError):
    """Missing, unexpected or mis-shaped parameters when merging weights into a model."""
