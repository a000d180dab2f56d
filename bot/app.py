"""Assembly of the program from its settings: engine, database, presets and chat service."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.settings import ENV_PREFIX, ConfigError, Settings, require_model
from chat.presets import default_preset_name, load_presets
from chat.session import ChatConfig, ChatService
from chat.states import MB, StatePolicy
from chat.storage import backend_for
from engine import loading as engine_loading
from engine.errors import EngineError
from engine.interface import Engine
from faq import FaqIndex, bundled_topics_dir, load_topics

log = logging.getLogger(__name__)


def load_faq(settings: Settings) -> tuple[FaqIndex, list[str]]:
    """The bundled FAQ plus the operator's folder; broken topic files are logged, skipped and
    returned (``file:line: problem``) so that a reload can report them."""
    folders = [bundled_topics_dir()]
    if settings.faq_dir is not None:
        folders.append(settings.faq_dir)
    result = load_topics(folders)
    for problem in result.problems:
        log.warning("FAQ topic skipped: %s", problem)
    return FaqIndex(result.topics.values()), result.problems


async def load_engine(settings: Settings) -> Engine:
    """Load the configured model, in a thread (it takes seconds to minutes). The engine loads the
    weights on the thread that will decode with them (engine.threads): this thread runs no torch
    parallel work, so the process keeps one OpenMP team."""
    path = require_model(settings)
    try:
        return await asyncio.to_thread(
            functools.partial(
                engine_loading.load_engine,
                path,
                settings.strategy,
                settings.tokenizer,
                engine=settings.engine,
                devices=None if settings.devices is None else settings.devices.split(","),
                max_batch=settings.max_batch,
                max_resident=settings.max_resident,
            )
        )
    except EngineError as exc:
        if settings.devices is not None and "device list" in str(exc):
            raise ConfigError(f"{ENV_PREFIX}DEVICES is set, but {exc}") from exc
        raise


def state_policy(settings: Settings) -> StatePolicy:
    """The state tiers' budgets and intervals from the settings."""
    return StatePolicy(
        device_bytes=settings.state_device_mb * MB,
        host_bytes=settings.state_host_mb * MB,
        db_bytes=settings.state_db_mb * MB,
        checkpoint_tokens=settings.checkpoint_tokens,
        carry_over_tokens=settings.carry_over_tokens,
        retention_s=settings.retention_days * 86400.0,
        transcript_s=settings.transcript_days * 86400.0,
    )


async def check_database(settings: Settings) -> None:
    """Open and check the database once before the model loads (which can take minutes), so
    that a damaged file or a folder the bot may not write is said at once."""
    store = await backend_for(settings.db).open(settings.db)
    await store.close()


async def build_service(
    settings: Settings, engine: Engine, faq: FaqIndex, *, check: bool = True
) -> ChatService:
    """Open the database and build a ready chat service (the caller closes it). ``check``: run
    the database's start-up check (done already when :func:`check_database` ran)."""
    presets = load_presets(settings.presets_dir)
    preset = default_preset_name(settings.preset, engine.spec.family, engine.spec.is_world)
    if preset not in presets:
        raise ConfigError(
            f"RWKV_DISCORD_PRESET is wrong (no preset {preset!r}): use 'auto' or one of "
            f"{', '.join(sorted(presets))}"
        )
    store = await backend_for(settings.db).open(settings.db, check=check)
    try:
        config = ChatConfig(
            default_preset=preset,
            max_input_tokens=settings.max_input_tokens,
            gen_max_tokens=settings.gen_max_tokens,
            chat_max_tokens=settings.chat_max_tokens,
            seed=settings.seed,
            states=state_policy(settings),
        )
        service = ChatService(engine, store, presets, config, faq=faq)
        await service.prepare()
    except BaseException:
        await store.close()
        raise
    log.info("ready: %s, preset %s, database %s", engine.describe(), preset, settings.db)
    return service


@asynccontextmanager
async def open_service(
    settings: Settings, engine: Engine, faq: FaqIndex, *, check: bool = True
) -> AsyncIterator[ChatService]:
    """A ready chat service on the loaded engine; its database is closed after (the engine is
    the caller's)."""
    service = await build_service(settings, engine, faq, check=check)
    try:
        yield service
    finally:
        await service.close()


@asynccontextmanager
async def open_chat(settings: Settings) -> AsyncIterator[ChatService]:
    """Load the model, open the database and yield a ready chat service; close both after."""
    require_model(settings)
    await check_database(settings)
    faq, _ = load_faq(settings)
    engine = await load_engine(settings)
    try:
        async with open_service(settings, engine, faq, check=False) as service:
            yield service
    finally:
        await engine.close()
