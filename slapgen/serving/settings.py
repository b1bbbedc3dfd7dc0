"""Service settings, read once from `SLAP_*` environment variables at the service's edge; a bad value
becomes one sentence naming the variable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from slapgen.database import absolute_sqlite_url
from slapgen.engine.caching import CacheSetting
from slapgen.engine.params import CompileScope, EngineOptions
from slapgen.errors import SettingsError, issue_sentence, validation_message
from slapgen.models.loading import TINY_MODEL_NAME, TINY_WAN_MODEL_NAME, default_cache_dir

DEFAULT_MODEL = "THUDM/CogVideoX-5b"
# After a store's SQLite file: why it is not the shared database replicas use.
DATABASE_URL_UNSET = "(SLAP_DATABASE_URL is unset)"


class SlapSettings(BaseSettings):
    """Every field maps to `SLAP_<FIELD>`; see the settings table in README.md."""

    model_config = SettingsConfigDict(env_prefix="SLAP_", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="hub id (THUDM/CogVideoX-5b, THUDM/CogVideoX-2b, Wan-AI/Wan2.1-T2V-1.3B-Diffusers, ...), local pipeline folder, `tiny` (CogVideoX) or `tiny-wan`",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="where the tiny model is materialised",
    )
    data_dir: Path | None = Field(
        None, description="what the service keeps: the studio's ratings (default: SLAP_CACHE_DIR/data)"
    )
    database_url: str | None = Field(
        None,
        description="where the job board, ratings and campaigns live: postgresql://USER:PASSWORD@HOST:PORT/DB "
        "for several replicas, or sqlite:///PATH; unset: SQLite files under SLAP_CACHE_DIR and SLAP_DATA_DIR",
    )
    results_dir: Path | None = Field(
        None, description="finished jobs' mp4s, read by every replica (default: SLAP_DATA_DIR/results)"
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
    job_lease_s: int = Field(
        900, ge=60, description="seconds an unfinished job may go without an update (the worker holding a job renews "
        "it every quarter of this, on the database's clock, unless its generation is hung) before a replica reading "
        "it or starting up, its own server included, fails it as its replica's gone or its generation hung; longer "
        "than a database failover"
    )
    stop_grace_s: int | None = Field(
        None, ge=1, description="seconds a replica told to stop (SIGTERM) has before it is killed: Kubernetes' "
        "terminationGracePeriodSeconds. Set, the jobs it still holds then are failed by any replica reading them "
        "right after that moment instead of after SLAP_JOB_LEASE_S; unset, only the lease"
    )
    max_queue: int = Field(
        16, ge=1, description="generations admitted at once per worker (running + waiting); more get HTTP 429"
    )
    max_queue_per_client: int | None = Field(
        None, ge=1, description="of SLAP_MAX_QUEUE, the most one client may hold at once per worker (running + "
        "waiting); more of its requests and jobs get HTTP 429, so one client cannot turn every other away. Clients "
        "are told apart by SLAP_CLIENT_HEADER, else by their address; unset: no per-client limit"
    )
    client_header: str | None = Field(
        None, pattern=r"^[A-Za-z0-9-]{1,64}$", description="the request header naming the client for "
        "SLAP_MAX_QUEUE_PER_CLIENT, set by your proxy or gateway (X-Real-IP, or X-Forwarded-For, whose last address "
        "is the one your proxy added); a request without it is told apart by its address. Unset: the connection's "
        "address, which behind a proxy is the proxy's, shared by every client"
    )
    workers: int = Field(
        1, ge=1, le=64, description="BentoML workers, each with its own model; on a GPU machine one per GPU"
    )

    quant: Literal["auto", "fp8", "fp8-weight", "int8", "none"] = Field(
        "auto", description="torchao quantisation of the transformer's linear layers; auto = fp8 on a capable GPU"
    )
    compile: bool = Field(False, description="torch.compile the transformer and warm it up before reporting ready")
    compile_scope: CompileScope = Field(
        "blocks", description="with SLAP_COMPILE: blocks compiles the transformer's repeated block once for all "
        "of them (regional compilation: a start-up compile that does not grow with depth); transformer compiles "
        "it whole (minutes for 5B)"
    )
    compile_cache_dir: Path | None = Field(
        None, description="a writable folder (a volume replicas share) for the compiled transformer, checked (and "
        "made) when SLAP_COMPILE is on; unset: torch's default"
    )
    attention: Literal["sdpa", "flash", "efficient", "cudnn", "math", "fa3", "fp8", "sage"] = Field(
        "sdpa", description="the transformer's attention kernel; sdpa lets PyTorch pick one per call"
    )
    cache: str = Field(
        "none", description="step caching: none, pab, fastercache, fbc:THRESHOLD (0 < THRESHOLD <= 1) or taylorseer"
    )
    adapters_dir: Path | None = Field(
        None, description="LoRA adapters: NAME.safetensors or NAME/ folders (default: SLAP_CACHE_DIR/adapters)"
    )
    max_lora_rank: int | Literal["auto"] = Field(
        "auto",
        description="highest adapter rank the hot-swap slot holds; auto: the largest adapter in SLAP_ADAPTERS_DIR "
        "at start-up, at least 128",
    )
    lora_target_modules: str | None = Field(
        None, pattern=r"^[\w.]+(,[\w.]+)*$",
        description="modules adapters may target; unset: the model family's (to_q,to_k,to_v,to_out.0 for CogVideoX and Wan)"
    )
    adapter_cache_size: int = Field(8, ge=1, description="adapters kept in CPU memory (LRU)")
    api_token: SecretStr | None = Field(
        None, description="bearer token for adapter upload/delete; unset disables them"
    )

    @field_validator("api_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value):
        return value or None

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url_parses(cls, value):
        from slapgen.database import database_url

        return database_url(value) if value else None  # ValueError -> one sentence naming SLAP_DATABASE_URL

    @field_validator("cache")
    @classmethod
    def _cache_parses(cls, value):
        CacheSetting.parse(value)  # ValueError -> one sentence naming SLAP_CACHE
        return value.strip()

    @field_validator("compile_cache_dir")
    @classmethod
    def _compile_cache_is_a_writable_folder(cls, value, info: ValidationInfo):
        if value is None:
            return None
        if not info.data.get("compile"):
            # Read only when compiling: reading settings (`slapgen campaign create`, a server without
            # SLAP_COMPILE) makes no folder and writes no file.
            return Path(value).expanduser().absolute()
        return writable_folder(value)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_in_range(cls, value):
        if value != "auto" and not 1 <= value <= 1024:
            raise ValueError(f"must be auto or a rank from 1 to 1024, got {value}")
        return value

    @model_validator(mode="after")
    def _adapters_under_the_cache(self) -> "SlapSettings":
        if self.adapters_dir is None:
            self.adapters_dir = self.cache_dir / "adapters"
        if self.data_dir is None:
            self.data_dir = self.cache_dir / "data"
            self._data_dir_defaulted = True
        if self.results_dir is None:
            self.results_dir = self.data_dir / "results"
        return self

    _data_dir_defaulted: bool = PrivateAttr(False)

    def unshared_data_dir(self) -> str | None:
        """A sentence when the database is shared (SLAP_DATABASE_URL, PostgreSQL) but SLAP_DATA_DIR is not set, so the data
        folder is this machine's cache: a campaign created so is in the replicas' database, its videos where no
        replica serves them from (every pair's video a 404, a walk-through's find). None otherwise."""
        if not (self.database_url and self._data_dir_defaulted) or self.database_url.startswith("sqlite"):
            return None  # a SQLite file is one machine's: its data folder is this one's too
        return (f"SLAP_DATABASE_URL is set but SLAP_DATA_DIR is not, so the videos went to {self.data_dir.absolute()}, "
                "this machine's cache: replicas serve a campaign's videos from their SLAP_DATA_DIR (the shared "
                "folder). Set SLAP_DATA_DIR to theirs, `slapgen campaign delete` this one and create it again")

    def ineffective(self) -> list[str]:
        """A sentence for each setting given that changes nothing with the others as they are: start-up says
        them, since a volume mounted for a cache nothing writes looks, from outside, like a cache that works."""
        unused = []
        if self.compile_cache_dir is not None and not self.compile:
            unused.append(f"SLAP_COMPILE_CACHE_DIR={self.compile_cache_dir} is not used: nothing is compiled "
                          f"without SLAP_COMPILE=1")
        if "compile_scope" in self.model_fields_set and not self.compile:
            unused.append(f"SLAP_COMPILE_SCOPE={self.compile_scope} is not used: nothing is compiled without "
                          "SLAP_COMPILE=1")
        if self.max_queue_per_client is not None and self.max_queue_per_client >= self.max_queue:
            unused.append(f"SLAP_MAX_QUEUE_PER_CLIENT={self.max_queue_per_client} is not used: it is not below "
                          f"SLAP_MAX_QUEUE={self.max_queue}, which every client shares")
        if self.client_header is not None and self.max_queue_per_client is None:
            unused.append(f"SLAP_CLIENT_HEADER={self.client_header} is not used: it tells clients apart for "
                          "SLAP_MAX_QUEUE_PER_CLIENT, which is unset")
        return unused

    def store_database(self, default_file: Path) -> str | Path:
        """Where a store lives: SLAP_DATABASE_URL, or else its own SQLite file."""
        return self.database_url or default_file

    def existing_store_database(self, sqlite_file: str) -> str | Path | None:
        """`store_database` for a command that only reads or deletes (`slapgen campaign list`, `slapgen ratings
        list`), or None where the store has none yet: no SLAP_DATABASE_URL and no SQLite file DATA/`sqlite_file`,
        so that such a command creates no file."""
        default = self.data_dir / sqlite_file
        if self.database_url is None and not default.is_file():
            return None
        return self.store_database(default)

    def where_campaigns_are(self) -> str:
        """The campaigns' store, as `slapgen campaign` names it in every line: a shell without the replicas'
        SLAP_DATABASE_URL wrote a campaign into a SQLite file no replica reads, and said only the data folder."""
        from slapgen.campaign_store import CAMPAIGNS_FILE

        return self._where_store_is(CAMPAIGNS_FILE)

    def where_ratings_are(self) -> str:
        """The studio's ratings store, as `slapgen ratings` names it (`where_campaigns_are`'s reason)."""
        from slapgen.serving.ratings import RATINGS_FILE

        return self._where_store_is(RATINGS_FILE)

    def _where_store_is(self, sqlite_file: str) -> str:
        from slapgen.database import shown_url

        if self.database_url:
            return shown_url(self.database_url)
        return f"{(self.data_dir / sqlite_file).absolute()} {DATABASE_URL_UNSET}"

    def where_state_is(self) -> str:
        """Which database and results folder the service uses, for its start-up line: replicas that do not share
        them lose each other's jobs, and nothing else showed it (one on SQLite by mistake looked like the others).
        The database URL without its password."""
        from slapgen.database import shown_url

        if self.database_url:
            stores = f"jobs, ratings and campaigns in {shown_url(self.database_url)}"
        else:
            stores = (f"jobs in {(self.cache_dir / 'jobs.sqlite').absolute()}, ratings and campaigns in SQLite files in "
                      f"{self.data_dir.absolute()} {DATABASE_URL_UNSET}")
        return f"{stores}; job results in {self.results_dir.absolute()}"

    def target_modules(self) -> tuple[str, ...] | None:
        """SLAP_LORA_TARGET_MODULES as module names; None when unset (the engine takes the model family's)."""
        return tuple(self.lora_target_modules.split(",")) if self.lora_target_modules else None

    def engine_options(self, worker_index: int = 1) -> EngineOptions:
        """What this worker's engine runs with; with several GPUs, worker k (1-based) takes GPU k-1."""
        import torch

        from slapgen.engine.attention import check_attention
        from slapgen.engine.quantization import choose_quantization

        device = self.resolved_device()
        if device == "cuda":
            device = f"cuda:{(worker_index - 1) % torch.cuda.device_count()}"
        # The model's dtype is not known yet: bf16 (what 5B runs in) on a GPU; the engine checks again with it.
        check_attention(self.attention, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
        return EngineOptions(
            device=device,
            offload=self.offload,
            quantization=choose_quantization(self.quant, device),
            compile=self.compile,
            compile_scope=self.compile_scope,
            compile_cache_dir=self.compile_cache_dir,
            adapters_dir=self.adapters_dir,
            max_lora_rank=None if self.max_lora_rank == "auto" else self.max_lora_rank,
            lora_target_modules=self.target_modules(),
            adapter_cache_size=self.adapter_cache_size,
            max_queue=self.max_queue,
            max_queue_per_client=self.max_queue_per_client,
            attention=self.attention,
            cache=CacheSetting.parse(self.cache),
        )

    def resolved_device(self) -> str:
        """The device to run on; SLAP_DEVICE=cuda without a usable GPU is a SettingsError (one sentence),
        not a worker that crashes and restarts forever."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("SLAP_DEVICE=cuda, but this machine has no usable CUDA GPU (torch "
                                f"{torch.__version__}); use SLAP_DEVICE=auto or cpu, or install a CUDA build of torch.")
        return self.device


def writable_folder(path: Path) -> Path:
    """`path` as an absolute folder, made if missing, after writing a file into it (an ownership or a read-only
    mount shows only then); ValueError with the reason otherwise."""
    import tempfile

    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():  # mkdir's "File exists" would say nothing useful
        raise ValueError(f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{path} is not a writable folder ({error.strerror or error})") from None
    return path


# Settings whose values an error never repeats: the token, and a database URL with its password.
SECRET_SETTINGS = frozenset({"api_token", "database_url"})


# The settings that name folders: a relative one is read from `load_settings`' `relative_to`.
FOLDER_SETTINGS = ("cache_dir", "data_dir", "results_dir", "adapters_dir", "compile_cache_dir")


def load_settings(relative_to: Path | None = None) -> SlapSettings:
    """The `SLAP_*` settings, checked; with `relative_to`, a relative folder setting (SLAP_ADAPTERS_DIR=adapters)
    is read from that folder. The service passes its own: `bentoml serve PATH` runs its workers in PATH but its own
    process where it was typed, which named, opened and migrated other folders than the workers served (a
    walk-through's start-up line listed CWD/myruns while the workers served an empty PATH/myruns)."""
    anchored = {}
    if relative_to is not None:
        given = {key.upper(): value for key, value in os.environ.items()}  # pydantic-settings ignores the case too
        for name in FOLDER_SETTINGS:
            value = given.get(f"SLAP_{name.upper()}")
            if value and not Path(value).expanduser().is_absolute():
                anchored[name] = (Path(relative_to) / value).resolve()
        database = given.get("SLAP_DATABASE_URL")  # sqlite:///relative.sqlite: a file named relatively too
        if database and (url := absolute_sqlite_url(database, Path(relative_to))) is not None:
            anchored["database_url"] = url
        model = given.get("SLAP_MODEL")  # a pipeline folder named relatively (a hub id or a built-in name stays)
        if model and model not in (TINY_MODEL_NAME, TINY_WAN_MODEL_NAME) and not Path(model).expanduser().is_absolute() \
                and (Path(relative_to) / model).is_dir():
            anchored["model"] = str((Path(relative_to) / model).resolve())
    try:
        return SlapSettings(**anchored)
    except ValidationError as error:
        raise SettingsError(f"invalid settings: {settings_problems(error)}.") from None


def settings_problems(error: ValidationError) -> str:
    """Each refused setting in one clause, named as it is set (SLAP_MAX_QUEUE) and with the value it was given,
    but never a secret's."""
    return "; ".join(
        issue_sentence(f"SLAP_{str(issue['loc'][0]).upper()}", issue, show_input=issue["loc"][0] not in SECRET_SETTINGS)
        if issue["loc"] else validation_message(issue)  # a check across settings names them itself
        for issue in error.errors()
    )
