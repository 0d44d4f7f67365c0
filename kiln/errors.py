"""User-facing errors. Each message says what went wrong and what to do about it."""


class KilnError(ValueError):
    """A user error (bad input, bad file, bad configuration). The CLI prints it as one line.

    `param` names the offending input field where there is one (the server reports it as OpenAI's `param`).
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(KilnError):
    """A model directory or weight file that kiln cannot read."""
