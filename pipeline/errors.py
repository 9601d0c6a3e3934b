"""Exceptions of imgindex; every message names the object and the next step."""

from __future__ import annotations


class ImgindexError(Exception):
    """Base of all errors a user can act on; the CLI shows the message alone."""


class DecodeError(ImgindexError):
    """One image could not be read or decoded; it becomes a Failure row."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DatasetError(ImgindexError):
    """A dataset folder is missing, not a folder, or holds no images."""


class IndexDirError(ImgindexError):
    """An index directory is missing, unreadable, or made by an incompatible build."""


class IndexLocked(ImgindexError):
    """Another build is writing the same index."""


class ModelUnavailable(ImgindexError):
    """The embedding model named is unknown or its package or weights are missing."""


class SchedulerUnreachable(ImgindexError):
    """The configured scheduler could not be used and fallback is off."""


class BuildFailed(ImgindexError):
    """The cluster could not finish a build (for example all workers lost)."""


class InvalidSchedulerAddress(ImgindexError):
    """A scheduler address that cannot be parsed (never a reason to fall back)."""


class WorkerEnvironmentError(ImgindexError):
    """A worker lacks imgindex or runs package versions the client cannot work with."""


class ConfigError(ImgindexError, ValueError):
    """A flag or ``imgindex.*`` setting holds a value it does not take."""


class BuildCancelled(ImgindexError):
    """Someone asked a running build to stop; its finished partitions are kept."""


def error_text(e: Exception) -> str:
    """One line for an ImgindexError or an OSError (naming its file)."""
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return str(e)
