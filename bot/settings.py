"""The one settings object: environment variables (``RWKV_DISCORD_*``) and a ``.env`` file."""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.device_names import parse_devices
from engine.strategy import normalise_strategy

ENV_PREFIX = "RWKV_DISCORD_"

# How to fix each setting, for the one-line start-up error.
FIXES: dict[str, str] = {
    "model": "point it at an RWKV .pth file, e.g. RWKV_DISCORD_MODEL=/models/rwkv7-g1-1.5b.pth",
    "strategy": "use 'auto', 'cpu fp32', 'cpu bf16', 'cpu int8', 'cuda fp16', 'cuda bf16' or 'cuda fp16i8'",
    "tokenizer": "use 'auto', 'world', or the path of a tokenizer.json",
    "engine": "use auto, batched (RWKV-7 only) or reference",
    "max_batch": "use a whole number from 1 to 1024",
    "max_resident": "use a whole number from 1 to 100000, or leave it unset",
    "devices": "list GPUs separated by commas, e.g. cuda:0,cuda:1, or leave it unset",
    "db": "give a writable file path, e.g. RWKV_DISCORD_DB=data/rwkv-discord.sqlite3",
    "preset": "use 'auto' or the name of a preset (g1-chat, raven-chat, raven-qa, or your own)",
    "presets_dir": "give an existing folder of .toml presets, or leave it unset",
    "faq_dir": "give an existing folder of FAQ .md topics, or leave it unset",
    "max_input_tokens": "use a whole number from 16 to 1000000",
    "gen_max_tokens": "use a whole number from 1 to 4096",
    "chat_max_tokens": "use a whole number from 1 to 4096",
    "seed": "use a whole number, or leave it unset",
    "log_level": "use DEBUG, INFO, WARNING or ERROR",
    "token": "set it to your bot token from the Discord developer portal",
    "allow_dms": "use true or false",
    "respond_to_mentions": "use true or false",
    "max_queue": "use a whole number from 0 to 100",
    "user_cooldown": "use a number of seconds from 0 to 3600",
    "edit_interval": "use a number of seconds from 1 to 10",
    "shutdown_grace": "use a number of seconds from 1 to 8 (Docker kills after 10)",
    "dev_guild": "use the numeric id of your test server, or leave it unset",
    "sync_commands": "use true or false",
    "metrics_port": "use a free TCP port such as 9100, or leave it unset",
    "state_device_mb": "use a whole number of MB from 0 (keep nothing) up, e.g. 2048",
    "state_host_mb": "use a whole number of MB from 0 (keep nothing) up, e.g. 8192",
    "state_db_mb": "use a whole number of MB, or 0 for no limit",
    "checkpoint_tokens": "use a whole number from 16 to 10000000, e.g. 65536",
    "carry_over_tokens": "use a whole number from 0 to 1000000, e.g. 2048",
    "retention_days": "use a number of days, or 0 to keep everything",
    "transcript_days": "use a number of days, or 0 to keep transcripts for good",
    "shard_count": "use the total number of shards of the bot, a whole number from 1, or leave it unset",
    "shard_ids": "list this process's shards as a range or with commas, e.g. 0-3 or 0,2,5, "
    "each below RWKV_DISCORD_SHARD_COUNT, or leave it unset",
    "cluster": "give the Ray cluster's address, e.g. ray://head:10001 or auto, or leave it unset",
    "cluster_app": "give the name of the Ray Serve application of the chat tier, e.g. rwkv-chat",
    "rest_rate": "use a whole number of requests a second from 1 to 10000, e.g. 45",
    "rest_url": "give the REST proxy's address with the API version, e.g. http://nirn-proxy:8080/api/v10, "
    "or leave it unset",
}


class ConfigError(Exception):
    """A wrong setting; the message is one line that names the setting and the fix."""


class Settings(BaseSettings):
    """Every setting of rwkv-discord. Environment variables are ``RWKV_DISCORD_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        protected_namespaces=(),
    )

    model: Path | None = Field(None, description="RWKV .pth model file")
    strategy: str = Field(
        "auto", description="device and precision, as the rwkv package; auto picks by the hardware"
    )
    engine: Literal["auto", "batched", "reference"] = Field(
        "auto", description="auto: the batched engine for RWKV-7, the rwkv package for RWKV-4 to 6"
    )
    max_batch: int = Field(32, ge=1, le=1024, description="sequences decoded together (batched engine)")
    max_resident: int | None = Field(None, ge=1, le=100_000, description="states kept on the device")
    devices: str | None = Field(
        None, description="GPUs for the batched engine, e.g. cuda:0,cuda:1: a model copy and worker on each"
    )
    tokenizer: str = Field("auto", description="auto, world, or a tokenizer.json path")
    db: Path | str = Field(
        Path("data/rwkv-discord.sqlite3"),
        description="SQLite database file, or postgresql://user@host/db?objects=s3://bucket/prefix",
    )
    preset: str = Field("auto", description="default prompt preset")
    presets_dir: Path | None = Field(None, description="folder of extra .toml presets")
    faq_dir: Path | None = Field(None, description="folder of extra or overriding FAQ topics")
    max_input_tokens: int = Field(2048, ge=16, le=1_000_000, description="cap on a message's tokens")
    gen_max_tokens: int = Field(256, ge=1, le=4096, description="length of +gen/+i/+qq/+qa")
    chat_max_tokens: int = Field(999, ge=1, le=4096, description="hard cap of a chat reply")
    seed: int | None = Field(None, description="seed for reproducible sampling")
    log_level: str = Field("INFO", description="logging level")
    token: SecretStr | None = Field(None, description="Discord bot token")
    allow_dms: bool = Field(False, description="answer direct messages")
    respond_to_mentions: bool = Field(True, description="answer @-mentions outside enabled channels")
    max_queue: int = Field(3, ge=0, le=100, description="messages waiting per channel")
    user_cooldown: float = Field(2.0, ge=0, le=3600, description="seconds between a user's messages")
    edit_interval: float = Field(1.0, ge=1.0, le=10.0, description="seconds between edits of a reply")
    shutdown_grace: float = Field(6.0, ge=1.0, le=8.0, description="seconds to finish at shutdown")
    dev_guild: int | None = Field(None, description="server to sync slash commands to instantly")
    sync_commands: bool = Field(False, description="register slash commands with Discord at start")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="Prometheus metrics port")
    state_device_mb: int = Field(2048, ge=0, description="conversation states kept where the model runs")
    state_host_mb: int = Field(8192, ge=0, description="states moved off the GPU, kept in host memory")
    state_db_mb: int = Field(0, ge=0, description="whole states in the database (0: no limit)")
    checkpoint_tokens: int = Field(
        65536, ge=16, le=10_000_000, description="store a whole state after this many logged tokens"
    )
    carry_over_tokens: int = Field(
        2048, ge=0, le=1_000_000, description="transcript tokens re-read after a model change"
    )
    retention_days: float = Field(30.0, ge=0, description="idle channels then keep only their chat state")
    transcript_days: float = Field(0.0, ge=0, description="transcript lines older than this are deleted")
    shard_count: int | None = Field(None, ge=1, le=100_000, description="total shards of the bot (sharded)")
    shard_ids: str | None = Field(None, description="this process's shards, e.g. 0-3 or 0,2,5")
    cluster: str | None = Field(None, description="Ray cluster address (ray://host:10001 or auto)")
    cluster_app: str = Field("rwkv-chat", description="Ray Serve application of the chat tier")
    rest_rate: int = Field(
        45, ge=1, le=10_000, description="Discord REST requests a second, shared by all processes"
    )
    rest_url: str | None = Field(None, description="REST API base, e.g. a nirn-proxy's /api/v10")

    @field_validator("strategy")
    @classmethod
    def _strategy_shape(cls, value: str) -> str:
        return normalise_strategy(value)

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return ",".join(parse_devices(value))

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"{value!r} is not a log level")
        return value.upper()

    @field_validator("shard_ids")
    @classmethod
    def _shards(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None
        if "shard_count" not in info.data:
            return value  # the count is wrong: that is the error to show
        count = info.data["shard_count"]
        if count is None:
            raise ValueError("shards are listed but RWKV_DISCORD_SHARD_COUNT is not set")
        return ",".join(str(shard) for shard in parse_shards(value, count))

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if value != "auto" and not re.fullmatch(r"(ray://)?[\w.\-]+:\d{1,5}", value):
            raise ValueError(f"{value!r} is not a Ray address")
        return value

    @field_validator("rest_url")
    @classmethod
    def _rest_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not re.fullmatch(r"https?://[\w.\-]+(:\d{1,5})?(/[\w.\-]+)*/api/v\d+", value):
            raise ValueError(f"{value!r} is not an http(s) address ending in /api/v10")
        return value

    @field_validator("cluster_app")
    @classmethod
    def _app_name(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.\-]+", value):
            raise ValueError(f"{value!r} is not an application name")
        return value

    @field_validator("db", mode="before")
    @classmethod
    def _database(cls, value: object) -> Path | str:
        return database_location(str(value))

    @field_validator("presets_dir", "faq_dir")
    @classmethod
    def _folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a folder")
        return value


def database_location(text: str) -> Path | str:
    """A database setting as the storage takes it: ``scheme://...`` (a server, such as
    Postgres) stays text, anything else is an SQLite file's path."""
    return text if "://" in text else Path(text)


def parse_shards(text: str, count: int) -> list[int]:
    """Shard ids written as ``0-3``, ``0,2,5`` or both (``0-3,8``), each below ``count``; sorted,
    without repeats. Raises ValueError saying what is wrong."""
    shards: set[int] = set()
    for part in text.replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"{part!r} is not a shard id or a range such as 0-3")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"the range {part} runs backwards")
        if last >= count:
            raise ValueError(f"shard {last} is past the last of the {count} shards, {count - 1}")
        shards.update(range(first, last + 1))
    return sorted(shards)


def shard_list(settings: Settings) -> list[int] | None:
    """This process's shards (all of them when only the count is set); None: not sharded."""
    if settings.shard_count is None:
        return None
    if settings.shard_ids is None:
        return list(range(settings.shard_count))
    return parse_shards(settings.shard_ids, settings.shard_count)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; command-line values (not None) override the environment.

    Raises :class:`ConfigError` with one line naming the variable and how to fix it.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "?"
        reason = str(error["msg"]).removeprefix("Value error, ")
        fix = FIXES.get(name, "see the configuration table in the README")
        raise ConfigError(f"{ENV_PREFIX}{name.upper()} is wrong ({reason}): {fix}") from None


def heartbeat_path(settings: Settings) -> Path:
    """The file a connected bot touches regularly (read by ``rwkv-discord health``): beside an
    SQLite database, or in the temporary folder for a database on a server. Each process of a
    sharded bot has its own (named by its shards), so that one process's heartbeat never
    answers for another's."""
    shards = shard_list(settings)
    suffix = "" if shards is None else f".shards-{shards[0]}-{shards[-1]}-of-{settings.shard_count}"
    if isinstance(settings.db, str):
        name = hashlib.sha256(settings.db.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"rwkv-discord-{name}{suffix}.heartbeat"
    return settings.db.with_name(settings.db.name + suffix + ".heartbeat")


def require_model(settings: Settings) -> Path:
    """The model path, or a :class:`ConfigError` saying how to set it."""
    if settings.model is None:
        raise ConfigError(
            f"{ENV_PREFIX}MODEL is not set: {FIXES['model']} (or pass --model); "
            "`rwkv-discord fetch-model` lists the RWKV-7 models and downloads one "
            "(`rwkv-discord make-model` writes a random one to try things out)"
        )
    if not settings.model.exists():
        raise ConfigError(
            f"{ENV_PREFIX}MODEL is wrong (no file at {settings.model}): put your RWKV .pth file there "
            "(in Docker: ./models/model.pth beside compose.yaml), or download one with "
            "`rwkv-discord fetch-model NAME` and point RWKV_DISCORD_MODEL at the file it prints"
        )
    return settings.model
