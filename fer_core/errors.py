"""The one exception type users see, and the one place that turns errors into a message:
the CLI prints it on one line and exits 2."""

from __future__ import annotations

import errno


class FerError(Exception):
    """A problem with the user's input (recipe, data, plugin, run directory).

    The message must name the file, line or key and say what was expected.
    """


class NonFiniteLossError(FerError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


_WHAT_TO_DO = {
    errno.ENOSPC: "the disk is full: free space (the last good checkpoint is kept) and resume",
    errno.EDQUOT: "the disk quota is exhausted: free space and resume",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EACCES: "permission denied: choose a location you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a location you can write",
    errno.ENOTDIR: "a path component is a file, not a directory: choose another path",
    errno.EISDIR: "expected a file but found a directory",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "the file name is too long",
}


def user_message(e: BaseException) -> str | None:
    """One line for errors the user can act on; None for genuine bugs (they get a traceback)."""
    if isinstance(e, FerError):
        return " ".join(str(e).split("\n"))
    if isinstance(e, OSError) and e.errno in _WHAT_TO_DO:
        where = e.filename or "(unknown file)"
        return f"{where}: {e.strerror or e} — {_WHAT_TO_DO[e.errno]}"
    if isinstance(e, MemoryError):
        return "out of memory: lower train.batch_size (or data.cache_images = false)"
    return None
