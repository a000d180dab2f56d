"""Durable channel state: kills at random points, tiers, checkpoints, carry-over, housekeeping."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chat.presets import load_presets
from chat.session import ChatConfig, ChatService
from chat.states import MB, StatePolicy, conversation
from chat.storage import Turn
from chat.storage.sqlite import SqliteStorage
from chat.tiers import StateTiers, _Entry
from engine.inprocess import ReferenceEngine
from engine.state import Snapshot
from engine.tokenizer import encode_prompt
from tests.conftest import TINY
from tools.make_model import write_random_model

DRIVER = Path(__file__).with_name("scripted_channels.py")
GREEDY = "-top_p=0 "


def driver_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_DISCORD_")}
    env.update(RWKV_DISCORD_CHAT_MAX_TOKENS="24", RWKV_DISCORD_GEN_MAX_TOKENS="12")
    env.update({f"RWKV_DISCORD_{k.upper()}": v for k, v in settings.items()})
    return env


def transcripts(db: Path, channels: int) -> dict[str, list[tuple[str, str, str]]]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {
            str(c): [
                tuple(r)
                for r in conn.execute(
                    "SELECT command, user_text, reply_text FROM turns WHERE channel_id = ? ORDER BY id",
                    (str(c),),
                )
            ]
            for c in range(channels)
        }
    finally:
        conn.close()


def test_kills_at_random_points_lose_no_answered_turn_and_change_no_reply(
    model_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL at random moments of a scripted conversation in many channels, restart, go on:
    every message answered before a kill is still stored, and the greedy replies of the whole
    run equal those of an uninterrupted run (which kept every state in memory, while the killed
    runs restore every state from checkpoints and the token log)."""
    kill_and_compare(model_dir, tmp_path, channels=3, rounds=10, seed=1234)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_kills_in_many_channels(model_dir: Path, tmp_path: Path, seed: int) -> None:
    """The kill test at a larger scale: more channels, every command of the script, more kills."""
    kill_and_compare(model_dir, tmp_path, channels=8, rounds=24, seed=seed)


def kill_and_compare(model_dir: Path, tmp_path: Path, channels: int, rounds: int, seed: int) -> None:
    args = [sys.executable, str(DRIVER), str(model_dir / "v7.pth")]

    whole = tmp_path / "whole.sqlite3"
    done = subprocess.run(
        [*args, str(whole), str(channels), str(rounds)],
        env=driver_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert done.stdout.strip().endswith("DONE"), done.stderr[-2000:]
    expected = transcripts(whole, channels)
    assert all(len(t) == rounds for t in expected.values())

    killed = tmp_path / "killed.sqlite3"
    # Nothing kept in memory between messages, and a whole state stored every few turns: each
    # message restores its channel from the database.
    env = driver_env(state_device_mb="0", state_host_mb="0", checkpoint_tokens="60")
    chooser = random.Random(seed)
    answered: list[dict[str, object]] = []
    kills = 0
    for _attempt in range(200):
        process = subprocess.Popen(
            [*args, str(killed), str(channels), str(rounds)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert process.stdout is not None
        kill_after = chooser.randint(2, 2 * channels + 2)  # answered lines, then a moment of the next
        finished = False
        for lines, line in enumerate(process.stdout, start=1):
            if line.strip() == "DONE":
                finished = True
                break
            answered.append(json.loads(line))
            if lines >= kill_after:
                time.sleep(chooser.uniform(0.0, 0.15))
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
        process.wait(timeout=60)
        if finished:
            break
    else:
        pytest.fail("the scripted conversation never finished")
    assert kills >= 3
    got = transcripts(killed, channels)
    for line in answered:
        _, _, reply = got[str(line["channel"])][int(str(line["round"]))]
        assert reply == line["text"] or (not reply and line["kind"] == "notice")
    assert got == expected
    conn = sqlite3.connect(killed)
    assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] > 0  # whole states were used
    conn.close()


# --------------------------------------------------------------------------- in-process checks


async def open_states_service(engine: ReferenceEngine, db: Path, **policy: object) -> ChatService:
    store = await SqliteStorage.open(db)
    config = ChatConfig(
        default_preset="g1-chat",
        gen_max_tokens=12,
        chat_max_tokens=24,
        states=StatePolicy(**policy),  # type: ignore[arg-type]
    )
    service = ChatService(engine, store, load_presets(), config)
    await service.prepare()
    return service


def bytes_written(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


async def test_a_turn_writes_tokens_not_states(engine7: ReferenceEngine, tmp_path: Path) -> None:
    """Between checkpoints a chat turn stores its tokens, not the state; every
    ``checkpoint_tokens`` one whole state is stored and the log before it is deleted."""
    db = tmp_path / "w.sqlite3"
    service = await open_states_service(engine7, db, checkpoint_tokens=200)
    try:
        state_bytes = (await service._init_snapshot(service.presets["g1-chat"])).nbytes()
        for i in range(12):
            await service.respond("c", f"{GREEDY}message {i}")
        numbers = await service.store.admin.stats()
        assert numbers["checkpoints"] >= 1
        # What a restart would rebuild equals what is in memory, bit for bit.
        durable = await service.states.durable("c", "chat")
        held = service.states.tiers.held("c")
        heads = await service.store.states.heads("c")
        assert durable is not None and torch.equal(durable.logits, held[heads["chat"]].logits)
        assert all(
            torch.equal(a, b) for a, b in zip(durable.tensors, held[heads["chat"]].tensors, strict=True)
        )
        # Only the states the heads need are kept: the log since the last checkpoint.
        conn = sqlite3.connect(db)
        replay = conn.execute("SELECT max(replay) FROM states").fetchone()[0]
        conn.close()
        assert replay <= 200 + 24 + 40
        assert numbers["states"] < 12
        assert state_bytes > 0
    finally:
        await service.store.close()


async def test_cold_channel_is_rebuilt_before_its_reply(engine7: ReferenceEngine, tmp_path: Path) -> None:
    """With no memory budget every other channel leaves memory; a message brings it back from
    the database first, and the replies equal those of channels kept in memory."""
    hot = await open_states_service(engine7, tmp_path / "hot.sqlite3")
    cold = await open_states_service(engine7, tmp_path / "cold.sqlite3", device_bytes=0, host_bytes=0)
    try:
        for i in range(3):
            for channel in ("a", "b", "c"):
                text = f"{GREEDY}hello {channel} {i}"
                assert (await hot.respond(channel, text)).tokens == (await cold.respond(channel, text)).tokens
        usage = cold.states.tiers.usage()
        assert usage["device_channels"] == 1 and usage["host_channels"] == 0  # only the last one
        assert cold.states.tiers.stats.restored >= 6
        assert hot.states.tiers.stats.restored == 0
    finally:
        await hot.store.close()
        await cold.store.close()


def fake_snapshot(nbytes: int) -> Snapshot:
    return Snapshot([torch.zeros(nbytes // 4 - 4)], torch.zeros(4), None, "fp")


def test_tiers_move_least_recently_used_channels_down_within_budgets() -> None:
    """Over the device budget the least recently used channel moves to host memory; over the
    host budget it leaves memory; a channel used again comes back to the device."""
    tiers = StateTiers(device_bytes=2 * MB, host_bytes=2 * MB)
    for name in ("a", "b", "c", "d"):
        tiers.put(name, {1: fake_snapshot(MB)})
    assert [tiers.where(n) for n in "abcd"] == ["host", "host", "device", "device"]
    usage = tiers.usage()
    assert usage["device_bytes"] <= 2 * MB and usage["host_bytes"] <= 2 * MB
    tiers.put("e", {1: fake_snapshot(MB)})
    tiers.put("f", {1: fake_snapshot(MB)})
    assert tiers.where("e") == "device" and tiers.where("f") == "device"
    assert tiers.where("c") == "host" and tiers.where("a") is None
    assert tiers.get("c", 1) is not None and tiers.where("c") == "device"
    assert tiers.where("e") == "host"  # the least recently used moved down to make room
    assert tiers.get("c", 2) is None  # a state the channel does not hold
    assert tiers.stats.promoted == 1 and tiers.stats.evicted == 2 and tiers.stats.demoted == 5


def test_tiers_keep_each_gpu_s_states_on_that_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With several devices, a state already on a GPU stays there, and a channel moved to host
    memory goes back to the device it came from, not to that of the engine's latest snapshot."""
    gpu, host = torch.device("meta"), torch.device("cpu")  # meta: a device without real copies
    moves: list[list[torch.device]] = []

    def move(snapshot: Snapshot, devices: list[torch.device]) -> Snapshot:
        moves.append(list(devices))
        tensors = [torch.empty(t.shape, device=d) for t, d in zip(snapshot.tensors, devices, strict=False)]
        return Snapshot(tensors, torch.empty(4, device=devices[-1]), None, "fp")

    def on(device: torch.device) -> Snapshot:
        return Snapshot([torch.empty(MB // 4 - 4, device=device)], torch.empty(4, device=device), None, "fp")

    monkeypatch.setattr("chat.tiers.move_snapshot", move)
    tiers = StateTiers(device_bytes=MB, host_bytes=4 * MB)
    tiers.learn(on(host))  # the engine's latest snapshot was made elsewhere
    tiers.put("b", {1: on(gpu)})
    assert moves == [] and tiers.held("b")[1].tensors[0].device == gpu  # left where it is
    tiers.put("a", {1: on(gpu)})  # over the budget: b goes to host memory
    assert tiers.where("b") == "host" and moves == [[host, host]]
    back = tiers.get("b", 1)
    assert back is not None and back.tensors[0].device == gpu
    assert moves == [[host, host], [gpu, gpu], [host, host]]  # b back where it came from; a down
    tiers.put("c", {1: on(host)})  # a state in host memory with no home: the learnt layout
    assert moves[3] == [host, host]
    assert tiers.where("b") == "device"  # the budget is per device: c's takes nothing from b's
    tiers.put("d", {1: on(gpu)})
    assert tiers.where("b") == "host"  # moved down again to make room for d on its GPU
    tiers.put("b", {2: on(host)})  # its states replaced while in host memory (as hold does)
    assert moves[-2] == [gpu, gpu]  # still its GPU's (then another channel moved down)


def test_the_device_budget_is_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each GPU keeps up to the budget of its own channels: a channel on a full GPU moves down,
    the least recently used of that GPU, not of another that still has room."""
    gpu0, gpu1 = torch.device("meta"), torch.device("cpu")  # two places (no GPU on this machine)

    def on(device: torch.device) -> Snapshot:
        return Snapshot([torch.empty(MB // 4 - 4, device=device)], torch.empty(4, device=device), None, "fp")

    def move(snapshot: Snapshot, devices: list[torch.device]) -> Snapshot:  # copies nothing
        return on(devices[0])

    monkeypatch.setattr("chat.tiers.move_snapshot", move)
    tiers = StateTiers(device_bytes=2 * MB, host_bytes=8 * MB)
    tiers.put("x0", {1: on(gpu1)})  # the least recently used of all, on the GPU with room
    for name in ("a0", "a1"):
        tiers.put(name, {1: on(gpu0)})
    tiers.put("x1", {1: on(gpu1)})
    assert [tiers.where(n) for n in ("x0", "a0", "a1", "x1")] == ["device"] * 4  # 2 MB on each
    tiers.put("a2", {1: on(gpu0)})
    assert [tiers.where(n) for n in ("x0", "a0", "a1", "x1", "a2")] == [
        "device",
        "host",
        "device",
        "device",
        "device",
    ]
    assert tiers.stats.demoted == 1
    # A channel with states on both GPUs (a reset read on another GPU than its undo copies)
    # counts on each: each GPU moves down its own least recently used channel. (Set in place:
    # put would move the state on "cpu", which stands for a second GPU here, to the first.)
    tiers._device["s"] = _Entry({1: on(gpu0), 2: on(gpu1)})
    assert tiers._device["s"].by_device == {gpu0: MB, gpu1: MB}
    assert tiers.device_usage() == {"meta": 3 * MB, "cpu": 3 * MB}
    tiers._shrink(protect="s")
    assert [tiers.where(n) for n in ("x0", "a1", "x1", "a2", "s")] == [
        "host",
        "host",
        "device",
        "device",
        "device",
    ]


def test_a_channel_s_states_join_the_one_already_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a channel's states come back from host memory together with a state just read on a
    GPU, they go to that GPU, not to the one the channel left: its states stay together."""
    gpu, host, other = torch.device("meta"), torch.device("cpu"), torch.device("cuda", 1)
    moves: list[list[torch.device]] = []

    def move(snapshot: Snapshot, devices: list[torch.device]) -> Snapshot:  # records, copies nothing
        moves.append(list(devices))
        return Snapshot(
            [torch.empty(t.shape, device="meta") for t in snapshot.tensors], snapshot.logits, None, "fp"
        )

    def on(device: torch.device) -> Snapshot:
        return Snapshot([torch.empty(MB // 4 - 4, device=device)], torch.empty(4, device=device), None, "fp")

    monkeypatch.setattr("chat.tiers.move_snapshot", move)
    tiers = StateTiers(device_bytes=MB, host_bytes=8 * MB)
    tiers.put("b", {1: on(gpu)})
    tiers.put("a", {1: on(gpu)})  # b goes to host memory
    assert tiers.where("b") == "host"
    tiers._host["b"].home = [other, other]  # it had been on another GPU
    moves.clear()
    tiers.put("b", {1: on(host), 2: on(gpu)})  # an old state, and one just read on this GPU
    assert moves[0] == [gpu, gpu]


async def test_model_change_carries_the_conversation_over(engine7: ReferenceEngine, tmp_path: Path) -> None:
    """After a switch to another model, the next message re-reads the transcript's last messages
    (within the token budget) into the new model, with a notice, instead of dropping them."""
    db = tmp_path / "switch.sqlite3"
    service = await open_states_service(engine7, db)
    try:
        for i in range(3):
            await service.respond("c", f"{GREEDY}message {i}")
        pairs = conversation(await service.store.transcripts.turns("c"))
    finally:
        await service.store.close()
    other = ReferenceEngine.load(write_random_model(tmp_path / "other.pth", 7, TINY, seed=99))
    assert other.spec.fingerprint != engine7.spec.fingerprint
    try:
        service = await open_states_service(other, db, carry_over_tokens=60)
        try:
            outcome = await service.respond("c", f"{GREEDY}and now?")
            (notice,) = [n for n in outcome.notices if "re-read" in n]
            assert "because the model changed" in notice and "of 3 messages" in notice
            kept = int(notice.split("last ")[1].split(" of")[0])
            assert 1 <= kept < 3  # the budget of 60 tokens did not hold all three
            tok = other.tokenizer
            carried: list[int] = []
            for message, reply in pairs[3 - kept :]:
                carried += encode_prompt(tok, f"User: {message}\n\nAssistant:")
                carried += encode_prompt(tok, f" {reply}\n\n")
            assert len(carried) <= 60
            opening = await service._init_snapshot(service.presets["g1-chat"])
            expected = await other.read(
                await other.read(opening, carried), encode_prompt(tok, "User: and now?\n\nAssistant:")
            )
            pre = await service.states.durable("c", "chat_pre")
            assert pre is not None and torch.equal(pre.logits, expected.logits)
            again = await service.respond("c", f"{GREEDY}and then?")
            assert not any("re-read" in n for n in again.notices)  # once only
        finally:
            await service.store.close()
    finally:
        await other.close()


def test_conversation_follows_resets_undo_and_retries() -> None:
    """The transcript replays into the current conversation the way the commands changed it."""
    turns = [
        Turn("chat", "a", "1", 1),
        Turn("+", "", "1b", 1),
        Turn("+gen", "story", "x", 1),
        Turn("+reset", "", "", 0),
        Turn("chat", "b", "2", 1),
        Turn("undo-reset", "", "", 0),
        Turn("chat", "c", "3", 1),
    ]
    assert conversation(turns) == [("a", "1b"), ("c", "3")]
    assert conversation(turns[:5]) == [("b", "2")]


async def test_housekeeping_trims_idle_channels_and_keeps_the_database_budget(
    engine7: ReferenceEngine, tmp_path: Path
) -> None:
    """Idle channels keep only their chat state; over the database budget the least recently
    used channels keep only their transcript, and their next message re-reads it."""
    db = tmp_path / "house.sqlite3"
    service = await open_states_service(
        engine7, db, checkpoint_tokens=16, device_bytes=0, host_bytes=0, retention_s=3600.0
    )
    try:
        for channel in ("a", "b", "c"):
            await service.respond(channel, f"{GREEDY}hello")
            await service.respond(channel, "+gen story")
        stats = await service.store.admin.stats()
        assert stats["checkpoints"] >= 3
        result = await service.housekeeping(now=time.time() + 7200)
        assert result["retired"] == 3
        for channel in ("a", "b", "c"):
            assert set(await service.store.states.heads(channel)) == {"chat"}
        one = (await service.store.admin.checkpointed_channels(10))[0][1]
        service.states.tiers.drop("c")
        object.__setattr__(service.config.states, "db_bytes", one)
        result = await service.housekeeping()
        assert result["frozen"] == 2
        assert await service.store.admin.checkpoint_usage() <= one
        assert await service.store.states.rebuild_pending("a")
        await service.respond("a", "+gen another story")  # not the chat: still to be re-read
        assert await service.store.states.rebuild_pending("a")
        outcome = await service.respond("a", f"{GREEDY}are you there?")
        assert any("re-read from its last 1 of 1 messages" in n for n in outcome.notices)
        assert not await service.store.states.rebuild_pending("a")
    finally:
        await service.store.close()


async def test_old_transcript_lines_are_deleted_and_the_conversation_goes_on(
    engine7: ReferenceEngine, tmp_path: Path
) -> None:
    """With a transcript retention, housekeeping deletes the lines older than it; the channel's
    states are untouched, so its next reply is the one it would have been."""
    kept = await open_states_service(engine7, tmp_path / "kept.sqlite3")
    trimmed = await open_states_service(engine7, tmp_path / "trimmed.sqlite3", transcript_s=3600.0)
    try:
        for service in (kept, trimmed):
            for text in ("hello", "how are you?"):
                await service.respond("c", f"{GREEDY}{text}")
        heads = await trimmed.store.states.heads("c")
        assert (await kept.housekeeping(now=time.time() + 7200))["transcript_lines"] == 0
        assert (await trimmed.housekeeping(now=time.time() + 60))["transcript_lines"] == 0
        assert (await trimmed.housekeeping(now=time.time() + 7200))["transcript_lines"] == 2
        assert (
            await trimmed.store.transcripts.turns("c") == []
            and len(await kept.store.transcripts.turns("c")) == 2
        )
        assert await trimmed.store.states.heads("c") == heads
        trimmed.states.tiers.drop("c")  # from the database: the log, not the transcript
        want = await kept.respond("c", f"{GREEDY}and now?")
        got = await trimmed.respond("c", f"{GREEDY}and now?")
        assert got.text == want.text and not got.notices
        assert len(await trimmed.store.transcripts.turns("c")) == 1
    finally:
        await kept.store.close()
        await trimmed.store.close()


async def test_purged_channel_keeps_nothing(engine7: ReferenceEngine, tmp_path: Path) -> None:
    """Purging a channel deletes its states, transcript and settings, in memory too."""
    service = await open_states_service(engine7, tmp_path / "purge.sqlite3")
    try:
        await service.respond("gone", f"{GREEDY}hello")
        await service.update_settings("gone", temperature=0.5)
        await service.respond("kept", f"{GREEDY}hello")
        assert await service.purge("gone")
        assert service.states.tiers.where("gone") is None
        assert (
            await service.store.states.heads("gone") == {}
            and await service.store.transcripts.turns("gone") == []
        )
        assert await service.store.channels.settings("gone") == {}
        assert await service.store.states.heads("kept") != {}
        assert service._locks == {}  # locks are not kept for idle channels
    finally:
        await service.store.close()


def test_state_budget_settings_are_checked() -> None:
    """A wrong budget at start-up is one line naming the setting and the fix."""
    from bot.settings import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"RWKV_DISCORD_CHECKPOINT_TOKENS is wrong.*16"):
        load_settings(checkpoint_tokens=3)
    with pytest.raises(ConfigError, match="RWKV_DISCORD_STATE_HOST_MB is wrong"):
        load_settings(state_host_mb=-1)


async def test_housekeeping_leaves_channels_used_meanwhile_alone(
    engine7: ReferenceEngine, tmp_path: Path
) -> None:
    """A channel used after housekeeping listed it is neither trimmed nor dropped, and one in
    memory is never dropped; trimming does not move a channel up the memory tiers."""
    service = await open_states_service(engine7, tmp_path / "race.sqlite3", checkpoint_tokens=16)
    try:
        await service.respond("idle", f"{GREEDY}hello")
        await service.respond("idle", "+gen story")
        listed_at = time.time()
        await service.respond("busy", f"{GREEDY}hello")
        await service.respond("busy", "+gen story")
        assert not await service.states.retire("busy", unused_since=listed_at)
        assert set(await service.store.states.heads("busy")) == {"chat", "chat_pre", "gen_0", "gen_1"}
        assert not await service.states.freeze("busy", unused_since=time.time())  # in memory
        assert await service.store.states.heads("busy")
        service.states.tiers.device_bytes = 1  # "idle" moves down to host memory
        service.states.tiers.put("busy", service.states.tiers.held("busy"))
        assert service.states.tiers.where("idle") == "host"
        assert await service.states.retire("idle", unused_since=time.time())
        assert service.states.tiers.where("idle") == "host"  # not brought up by trimming
        assert set(await service.store.states.heads("idle")) == {"chat"}
    finally:
        await service.store.close()


async def test_dropped_channel_without_chat_messages_starts_quietly(
    engine7: ReferenceEngine, tmp_path: Path
) -> None:
    """A dropped channel with nothing to re-read says nothing about re-reading."""
    service = await open_states_service(engine7, tmp_path / "quiet.sqlite3", checkpoint_tokens=16)
    try:
        await service.respond("g", "+gen story")
        service.states.tiers.drop("g")
        assert await service.states.freeze("g", unused_since=time.time())
        outcome = await service.respond("g", f"{GREEDY}hello")
        assert outcome.kind == "reply" and outcome.notices == ()
    finally:
        await service.store.close()
