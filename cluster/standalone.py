"""A chat-service factory from a model file and a store location, without the bot's settings.

The replicas of :mod:`cluster.deployment` build their service from a factory they are given; the
bot passes its own (the settings' model, database and presets). This one serves benchmarks and
tests: it pickles (a frozen dataclass), so a replica on another node can call it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from chat.presets import load_presets
from chat.session import ChatConfig, ChatService
from chat.storage import backend_for
from engine.loading import load_engine


@dataclass(frozen=True)
class StandaloneService:
    """Opens a ready chat service on ``model`` (loaded with ``strategy`` by ``engine``) and the
    store at ``store`` (a path, or ``scheme://...``); closes both after."""

    model: Path
    store: str
    preset: str = "g1-chat"
    strategy: str = "cpu fp32"
    engine: str = "reference"  # or "batched"
    chat_max_tokens: int = 48
    gen_max_tokens: int = 24
    max_batch: int = 8
    seed: int | None = None
    threads: int = 1  # torch threads of the process (CPU replicas share the machine's cores)

    def __call__(self) -> AbstractAsyncContextManager[ChatService]:
        return self._open()

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[ChatService]:
        import torch

        torch.set_num_threads(self.threads)
        engine = await asyncio.to_thread(
            load_engine,
            self.model,
            self.strategy,
            engine="batched" if self.engine == "batched" else "reference",
            max_batch=self.max_batch,
        )
        try:
            store = await backend_for(self.store).open(self.store)
            config = ChatConfig(
                default_preset=self.preset,
                chat_max_tokens=self.chat_max_tokens,
                gen_max_tokens=self.gen_max_tokens,
                seed=self.seed,
            )
            try:
                service = ChatService(engine, store, load_presets(), config)
            except BaseException:
                await store.close()
                raise
            try:
                await service.prepare()
                yield service
            finally:
                await service.close()
        finally:
            await engine.close()
