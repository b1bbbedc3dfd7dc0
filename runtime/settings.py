"""Service settings, read once from `SLAP_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
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

    quant: Literal["auto", "fp8", "fp8-weight", "int8", "none"] = Field(
        "auto", description="torchao quantisation of the transformer's linear layers; auto = fp8 on a capable GPU"
    )
    compile: bool = Field(False, description="torch.compile the transformer and warm it up before reporting ready")
    adapters_dir: Path = Field(
        Path.home() / ".cache" / "slapgen" / "adapters", description="LoRA adapters: NAME.safetensors or NAME/ folders"
    )
    max_lora_rank: int = Field(128, ge=1, le=1024, description="highest adapter rank the hot-swap slot holds")
    lora_target_modules: str = Field(
        "to_q,to_k,to_v,to_out.0", pattern=r"^[\w.]+(,[\w.]+)*$", description="modules adapters may target"
    )
    adapter_cache_size: int = Field(8, ge=1, description="adapters kept in CPU memory (LRU)")
    api_token: SecretStr | None = Field(
        None, description="bearer token for adapter upload/delete; unset disables them"
    )

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value):
        return value or None

    def target_modules(self) -> list[str]:
        return self.lora_target_modules.split(",")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
