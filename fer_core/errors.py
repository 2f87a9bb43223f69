"""The one exception type users see: the CLI prints its message on one line and exits 2."""


class FerError(Exception):
    """A problem with the user's input (recipe, data, plugin, run directory).

    The message must name the file, line or key and say what was expected.
    """


class NonFiniteLossError(FerError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""
