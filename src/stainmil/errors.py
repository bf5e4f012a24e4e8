"""Exceptions whose message is one sentence a user can act on (what, where, what to do).

The CLI prints ``str(exc)`` of any :class:`StainmilError` and exits non-zero without a traceback.
"""


class StainmilError(Exception):
    """Base class of every error stainmil raises on purpose."""


class ConfigError(StainmilError):
    """A configuration file or override is wrong."""


class DataError(StainmilError):
    """Input data (patch folder, labels, splits) cannot be used."""


class StoreError(StainmilError):
    """The feature store is missing, incomplete or made with other settings."""


class TrainingError(StainmilError):
    """Training cannot go on (NaN loss, empty split, broken checkpoint)."""
