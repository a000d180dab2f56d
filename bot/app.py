"""Assembly of the program from its settings: engine, database, presets and chat service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.settings import ConfigError, Settings, require_model
from chat.presets import default_preset_name, load_presets
from chat.session import ChatConfig, ChatService, FaqLookup
from chat.store import Store
from engine.inprocess import ReferenceEngine
from faq import FaqIndex, bundled_topics_dir, load_topics

log = logging.getLogger(__name__)


def load_faq(settings: Settings) -> FaqIndex:
    """The bundled FAQ plus the operator's folder; broken topic files are logged and skipped."""
    folders = [bundled_topics_dir()]
    if settings.faq_dir is not None:
        folders.append(settings.faq_dir)
    result = load_topics(folders)
    for problem in result.problems:
        log.warning("FAQ topic skipped: %s", problem)
    return FaqIndex(result.topics.values())


@asynccontextmanager
async def open_chat(settings: Settings, faq: FaqLookup | None = None) -> AsyncIterator[ChatService]:
    """Load the model, open the database and yield a ready chat service; close both after."""
    path = require_model(settings)
    faq = faq if faq is not None else load_faq(settings)
    presets = load_presets(settings.presets_dir)
    engine = await asyncio.to_thread(ReferenceEngine.load, path, settings.strategy, settings.tokenizer)
    try:
        preset = default_preset_name(settings.preset, engine.spec.family, engine.spec.is_world)
        if preset not in presets:
            raise ConfigError(
                f"RWKV_DISCORD_PRESET is wrong (no preset {preset!r}): use 'auto' or one of "
                f"{', '.join(sorted(presets))}"
            )
        store = await Store.open(settings.db)
        try:
            config = ChatConfig(
                default_preset=preset,
                max_input_tokens=settings.max_input_tokens,
                gen_max_tokens=settings.gen_max_tokens,
                chat_max_tokens=settings.chat_max_tokens,
                seed=settings.seed,
            )
            service = ChatService(engine, store, presets, config, faq=faq)
            await service.prepare()
            log.info("ready: %s, preset %s, database %s", engine.describe(), preset, settings.db)
            yield service
        finally:
            await store.close()
    finally:
        await engine.close()
