"""Errors whose message is a single line meant for the person at the terminal."""


class DatasetError(ValueError):
    """The dataset cannot be read as given (missing file, empty caption, wrong column, ...)."""


class ClipError(ValueError):
    """One clip cannot be used; training skips it and reports why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason  # short code: "corrupt" or "too_short"


class TrainConfigError(ValueError):
    """A training configuration or override is invalid."""
