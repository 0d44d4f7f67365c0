"""User-facing errors. Each message says what went wrong and what to do about it."""


class KilnError(ValueError):
    """A user error (bad input, bad file, bad configuration). The CLI prints it as one line."""


class ModelLoadError(KilnError):
    """A model directory or weight file that kiln cannot read."""
