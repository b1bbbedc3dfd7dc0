"""Read settings once at the service edge and turn bad values into one readable sentence."""

from __future__ import annotations

from pydantic import ValidationError

from runtime.errors import ModelUnavailableError
from runtime.settings import SlapSettings


class SettingsError(ValueError):
    """A `SLAP_*` environment variable holds a value that cannot be used."""


def load_settings() -> SlapSettings:
    try:
        return SlapSettings()
    except ValidationError as error:
        problems = "; ".join(
            f"SLAP_{'_'.join(str(part) for part in issue['loc']).upper()}: {issue['msg']}"
            for issue in error.errors()
        )
        raise SettingsError(f"invalid settings: {problems}.") from None


__all__ = ["ModelUnavailableError", "SettingsError", "load_settings"]
