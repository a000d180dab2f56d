"""Leases in the chat service: two services with owners share one store, as replicas do.

Greedy replies make the conversations comparable: a channel that moves between services must
answer exactly as one service alone would, so a stale state in memory would show.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chat.housekeeping import keep_house
from chat.outcome import Outcome, OutcomeKind
from chat.session import MOVED, ChatService
from chat.states import StatePolicy
from chat.storage import HeadName
from engine.inprocess import ReferenceEngine
from engine.interface import TextDelta
from tests.conftest import open_service

MESSAGES = ["Hello there.", "What is your name?", "Tell me about the sea.", "And the sky?"]


@pytest.fixture
async def pair(model_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[ChatService, ChatService]]:
    """Services "a" and "b", each on its own engine, sharing one SQLite file."""
    services = []
    for owner in ("a", "b"):
        engine = ReferenceEngine.load(model_dir / "v7.pth")
        services.append(await open_service(engine, tmp_path / "shared.sqlite3", owner=owner))
    await services[0].update_settings("c", top_p=0.0)  # greedy
    try:
        yield services[0], services[1]
    finally:
        for service in services:
            await service.store.close()


async def alone(engine7: ReferenceEngine, db: Path, messages: list[str]) -> list[str]:
    """The greedy replies of one service without an owner to ``messages`` in one channel."""
    service = await open_service(engine7, db)
    try:
        await service.update_settings("c", top_p=0.0)
        return [(await service.respond("c", text)).text for text in messages]
    finally:
        await service.store.close()


async def test_without_an_owner_no_lease_is_taken(service: ChatService) -> None:
    outcome = await service.respond("c", "Hello there.")
    assert outcome.kind is OutcomeKind.REPLY
    assert await service.store.leases.holder("c") is None
    assert service.states.epochs == {}


async def test_the_first_message_takes_the_lease_and_keeps_it(pair: tuple[ChatService, ChatService]) -> None:
    a, _ = pair
    await a.respond("c", MESSAGES[0])
    assert await a.store.leases.holder("c") == ("a", 1)
    await a.respond("c", MESSAGES[1])
    assert await a.store.leases.holder("c") == ("a", 1)  # held, not taken again
    assert a.states.epochs == {"c": 1}


async def test_a_channel_moving_between_services_answers_as_one_service_would(
    pair: tuple[ChatService, ChatService], engine7: ReferenceEngine, tmp_path: Path
) -> None:
    a, b = pair
    expected = await alone(engine7, tmp_path / "alone.sqlite3", MESSAGES)
    replies = [
        (await a.respond("c", MESSAGES[0])).text,
        (await a.respond("c", MESSAGES[1])).text,
        (await b.respond("c", MESSAGES[2])).text,  # b takes the channel: epoch 2
        (await a.respond("c", MESSAGES[3])).text,  # a's memory is stale: taken back, re-read
    ]
    assert replies == expected
    assert await a.store.leases.holder("c") == ("a", 3)
    assert [t.reply_text for t in await a.store.transcripts.turns("c")] == expected


async def test_a_stale_service_cannot_commit_after_another_took_the_channel(
    pair: tuple[ChatService, ChatService], engine7: ReferenceEngine, tmp_path: Path
) -> None:
    a, b = pair
    await a.respond("c", MESSAGES[0])
    stale = a.handle("c", MESSAGES[1])
    first = await anext(stale)
    assert isinstance(first, TextDelta)  # a holds epoch 1 and is writing its reply
    newer = await b.respond("c", MESSAGES[2])  # meanwhile b takes the channel and answers
    assert newer.kind is OutcomeKind.REPLY
    heads = await a.store.states.heads("c")
    rest = [event async for event in stale]
    outcome = rest[-1]
    assert isinstance(outcome, Outcome)
    assert (outcome.kind, outcome.text) == (OutcomeKind.ERROR, MOVED)
    # nothing of a's reply was stored: b's conversation is the durable one
    assert await a.store.states.heads("c") == heads
    assert [t.user_text for t in await a.store.transcripts.turns("c")] == [MESSAGES[0], MESSAGES[2]]
    assert await a.store.leases.holder("c") == ("b", 2)
    assert "c" not in a.states.epochs and a.states.tiers.where("c") is None  # a forgot the channel
    # a's next message takes the channel back and goes on from b's conversation
    expected = await alone(engine7, tmp_path / "alone.sqlite3", [MESSAGES[0], MESSAGES[2], MESSAGES[3]])
    assert (await a.respond("c", MESSAGES[3])).text == expected[2]
    assert await a.store.leases.holder("c") == ("a", 3)


async def test_reset_and_undo_take_the_lease_and_are_fenced(pair: tuple[ChatService, ChatService]) -> None:
    a, b = pair
    await a.respond("c", MESSAGES[0])
    await b.reset("c")
    assert await b.store.leases.holder("c") == ("b", 2)
    assert HeadName.UNDO_CHAT in await b.store.states.heads("c")
    assert await a.undo_reset("c")  # a takes it back (epoch 3) before writing
    assert await a.store.leases.holder("c") == ("a", 3)
    assert HeadName.UNDO_CHAT not in await a.store.states.heads("c")


async def test_housekeeping_of_a_channel_another_service_took_leaves_it_alone(
    pair: tuple[ChatService, ChatService],
) -> None:
    a, b = pair
    await a.respond("c", MESSAGES[0])
    await a.respond("c", "+gen Once upon a time")
    await b.respond("c", MESSAGES[1])  # b holds epoch 2; a still remembers epoch 1
    heads = await a.store.states.heads("c")
    assert not await a.states.retire("c", unused_since=2e9)  # fenced: not a's to trim
    assert await a.store.states.heads("c") == heads
    assert "c" not in a.states.epochs


@pytest.fixture
async def budgeted(model_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[ChatService, ChatService]]:
    """Services "a" and "b" sharing one SQLite file, each storing a whole state every turn and
    allowed almost no bytes of them (so that housekeeping looks for channels to freeze)."""
    services = []
    policy = StatePolicy(db_bytes=1, checkpoint_tokens=1)
    for owner in ("a", "b"):
        engine = ReferenceEngine.load(model_dir / "v7.pth")
        services.append(await open_service(engine, tmp_path / "shared.sqlite3", owner=owner, states=policy))
    await services[0].update_settings("c", top_p=0.0)
    try:
        yield services[0], services[1]
    finally:
        for service in services:
            await service.store.close()


async def test_housekeeping_leaves_the_channels_of_other_services_alone(
    budgeted: tuple[ChatService, ChatService], engine7: ReferenceEngine, tmp_path: Path
) -> None:
    """b's housekeeping (every replica runs its own) does not freeze a channel that a serves,
    though b never held it and it is not in b's memory; an idle one b may retire under a lease it
    takes, and a then goes on from the durable head as one service alone would."""
    a, b = budgeted
    expected = await alone(engine7, tmp_path / "alone.sqlite3", MESSAGES[:3])
    first = (await a.respond("c", MESSAGES[0])).text
    heads = await a.store.states.heads("c")
    assert await a.store.admin.checkpoint_usage() > 1  # over the budget: housekeeping looks
    done = await keep_house(b)
    assert done["frozen"] == 0
    assert await a.store.states.heads("c") == heads and await a.store.leases.holder("c") == ("a", 1)
    second = await a.respond("c", MESSAGES[1])
    assert second.kind is OutcomeKind.REPLY and not second.notices
    idle = await keep_house(b, now=time.time() + 60 * 86400)  # past the retention
    assert idle["retired"] == 1 and await b.store.leases.holder("c") == ("b", 2)
    third = await a.respond("c", MESSAGES[2])  # a takes it back, from the stored chat state
    assert [first, second.text, third.text] == expected
    assert await a.store.leases.holder("c") == ("a", 3)
