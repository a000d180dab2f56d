"""Shared fixtures: tiny random models written by the real make-model code, real SQLite files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chat.presets import load_presets
from chat.session import ChatConfig, ChatService
from chat.storage.sqlite import SqliteStorage
from engine.inprocess import ReferenceEngine
from tools.make_model import ModelShape, write_random_model

TINY = ModelShape(n_layer=2, n_embd=64)  # World vocabulary


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one tiny World-vocabulary model per RWKV version: v4.pth ... v7.pth."""
    folder = tmp_path_factory.mktemp("models")
    for version in (4, 5, 6, 7):
        write_random_model(folder / f"v{version}.pth", version, TINY, seed=version)
    return folder


def make_json_tokenizer(path: Path) -> Tokenizer:
    """A small byte-level BPE tokenizer.json, like the 20B one: <|endoftext|> is id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["Hello there, how are you?\n\nI am fine.\n\n", "Bob: hi\n\nAlice: hello\n\n"] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(path))
    return tokenizer


@pytest.fixture(scope="session")
def pile_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RWKV-4 model with its own tokenizer.json beside it (the Pile/Raven set-up)."""
    folder = tmp_path_factory.mktemp("pile")
    tokenizer = make_json_tokenizer(folder / "tokenizer.json")
    shape = ModelShape(n_layer=2, n_embd=64, vocab_size=tokenizer.get_vocab_size())
    return write_random_model(folder / "raven.pth", 4, shape, seed=11)


@pytest.fixture(scope="session")
def engine7(model_dir: Path) -> ReferenceEngine:
    """The tiny RWKV-7 model, loaded once for the session."""
    return ReferenceEngine.load(model_dir / "v7.pth")


async def open_service(engine: ReferenceEngine, db: Path, **config: object) -> ChatService:
    """A chat service on a real SQLite file (the caller closes ``service.store``)."""
    store = await SqliteStorage.open(db)
    options: dict[str, object] = {"default_preset": "g1-chat", "gen_max_tokens": 24, "chat_max_tokens": 48}
    options.update(config)
    service = ChatService(engine, store, load_presets(), ChatConfig(**options))  # type: ignore[arg-type]
    await service.prepare()
    return service


@pytest.fixture
async def service(engine7: ReferenceEngine, tmp_path: Path) -> AsyncIterator[ChatService]:
    """A chat service on the tiny RWKV-7 model and a fresh database."""
    svc = await open_service(engine7, tmp_path / "chat.sqlite3")
    try:
        yield svc
    finally:
        await svc.store.close()
