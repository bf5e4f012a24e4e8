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


class OutputError(StainmilError):
    """An output folder cannot be written (full disk or quota, read-only, not ours)."""


FULL = {28, 122}                 # ENOSPC, EDQUOT
READ_ONLY = {30, 13, 1}          # EROFS, EACCES, EPERM


def output_error(exc: OSError, folder: object, creating: bool = True) -> OutputError | None:
    """The one sentence for an OSError met while writing into ``folder`` (None: not a full or read-only folder).
    ``creating``: the error came from creating a file there (a permission error then is the folder's; while
    writing, only a read-only file system is). h5py reports the errno only inside its message: both are read."""
    text = str(exc)
    number = exc.errno if isinstance(exc.errno, int) else next(
        (n for n in (28, 122, 30, 13) if f"errno = {n}," in text), None)
    if number in FULL or "No space left on device" in text or "Disk quota exceeded" in text:
        return OutputError(f"{folder} is full (no space left on the device, or your quota); free space or point the "
                           "output setting elsewhere, then run the same command again: it resumes, keeping what "
                           "was finished.")
    if (number in READ_ONLY if creating else number == 30) or "Read-only file system" in text:
        return OutputError(f"{folder} cannot be written ({exc.strerror or text}); point the output setting at a "
                           "folder you can write, or fix its permissions.")
    return None
