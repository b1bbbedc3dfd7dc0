"""Errors that carry a single sentence meant for the person running the command."""


class ModelUnavailableError(RuntimeError):
    """The configured model cannot be found or loaded; the message says how to fix it."""
