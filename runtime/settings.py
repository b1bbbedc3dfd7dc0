"""Service settings, read once from `SLAP_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "THUDM/CogVideoX-5b"


class SlapSettings(BaseSettings):
    """Every field maps to `SLAP_<FIELD>`; see the settings table in README.md."""

    model_config = SettingsConfigDict(env_prefix="SLAP_", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="hub id (THUDM/CogVideoX-5b, THUDM/CogVideoX-2b), local pipeline folder, or `tiny`",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "slapgen",
        description="where the tiny model is materialised",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` picks cuda when available"
    )
    offload: Literal["none", "model"] = Field(
        "none", description="`model` moves each sub-model to the GPU only while it runs"
    )
    request_timeout_s: int = Field(
        3600, ge=1, description="seconds a request may wait and run before the server gives up"
    )
    max_queue: int = Field(
        16, ge=1, description="requests admitted at once (running + waiting); more get HTTP 429"
    )

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
