"""``rwkv-discord bench-states``: what keeping channel states costs, measured on real files.

Three measurements, each through the real storage code (:mod:`chat.states`, :mod:`chat.storage`)
on a fresh SQLite file:

1. **writes per chat turn**: a long conversation in one channel, each turn storing its prompt and
   reply tokens, with states of the real shape of a named model size (``--size 1.5B``: 24 layers,
   width 2048, 12.8 MB of state). Bytes written are the process's ``write()`` bytes (the WAL,
   SQLite's copy of it into the database file, checkpoints included), from ``/proc/self/io``.
   Storing needs no model: the states are random tensors of the real shape.
2. **restoring a channel**: hot (held on the device), and cold (its checkpoint read back from
   SQLite and checked, then its logged tokens re-read by the model). The re-reading needs a model
   of that shape (``--model``); it is measured for ``--replay`` tokens and the average cold restore
   (half the checkpoint interval to re-read) is computed from that speed.
3. **many channels**: ``--channels`` channels of 3 chat turns each (token log and transcript);
   the database size, the time to open it and find a channel's state (against 10 channels),
   memory while restoring ``--restores`` channels one after another under tier budgets of 20
   channels each (the growth over the second and the last two fifths, after a fifth to warm up),
   and one housekeeping pass keeping the database's checkpoints within a budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chat.states import ChannelStates, Loaded, StatePolicy, Step
from chat.storage import HeadName, NewRef, NewState, StateBase, Storage, Turn, backend_for
from engine.interface import Engine
from engine.state import Snapshot
from tools.make_model import HEAD_SIZE, NAMED_SHAPES, ModelShape

PROG = "rwkv-discord bench-states"
VOCAB = 65536


def shaped_snapshot(shape: ModelShape, fingerprint: str, seed: int = 0) -> Snapshot:
    """A random RWKV-7 state of a model's real shape (fp16 token shifts, fp32 wkv state)."""
    generator = torch.Generator().manual_seed(seed)
    heads = shape.n_embd // HEAD_SIZE
    tensors: list[torch.Tensor] = []
    for _ in range(shape.n_layer):
        tensors.append(torch.randn(shape.n_embd, generator=generator).half())
        tensors.append(torch.randn(heads, HEAD_SIZE, HEAD_SIZE, generator=generator))
        tensors.append(torch.randn(shape.n_embd, generator=generator).half())
    return Snapshot(tensors, torch.randn(VOCAB, generator=generator), 11, fingerprint, {"mode": "chat"})


def written_bytes() -> int:
    """Bytes this process has passed to write() so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise OSError("/proc/self/io has no wchar line")


async def _no_model(start: Snapshot | None, tokens: list[int]) -> Snapshot:
    raise RuntimeError("this measurement stores states and never re-reads them")


async def _no_opening(key: str) -> Snapshot:
    raise RuntimeError("this measurement starts from stored states")


async def _no_encode(text: str) -> list[int]:
    raise RuntimeError("this measurement stores tokens, not text")


def _states(store: Storage, fingerprint: str, policy: StatePolicy, read: Any = _no_model) -> ChannelStates:
    return ChannelStates(
        store, fingerprint=fingerprint, read=read, policy=policy, opening=_no_opening, encode=_no_encode
    )


async def _open(path: Path) -> Storage:
    return await backend_for(path).open(path)


def _tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(count)]


async def write_cost(
    folder: Path, shape: ModelShape, *, intervals: int, prompt: int, reply: int, checkpoint_tokens: int
) -> dict[str, Any]:
    """Bytes written per chat turn over whole checkpoint intervals of a long conversation.

    The conversation runs until its first checkpoint; then bytes are counted over the next
    ``intervals`` checkpoints, from just after one to just after the other, with the WAL copied
    into the database file at both ends (so each end holds the same share of that copying).
    """
    fingerprint = "bench"
    snapshot = shaped_snapshot(shape, fingerprint)
    store = await _open(folder / "writes.sqlite3")
    policy = StatePolicy(checkpoint_tokens=checkpoint_tokens, device_bytes=64 * snapshot.nbytes())
    states = _states(store, fingerprint, policy)
    rng = random.Random(0)
    chat = Loaded(None, StateBase.INIT, snapshot, "preset", 0)

    async def turn() -> None:
        nonlocal chat
        steps = [Step(_tokens(rng, prompt), snapshot), Step(_tokens(rng, reply), snapshot)]
        line = Turn("chat", "m" * prompt * 4, "r" * reply * 4, reply)
        chat = (await states.commit("c", chat, steps, {HeadName.CHAT_PRE: 0, HeadName.CHAT: 1}, line))[
            HeadName.CHAT
        ]

    while states.checkpoints_written < 1:
        await turn()
    await store.admin.flush()
    before = written_bytes()
    started = time.perf_counter()
    turns = 0
    while states.checkpoints_written < 1 + intervals:
        await turn()
        turns += 1
    await store.admin.flush()
    elapsed = time.perf_counter() - started
    written = written_bytes() - before
    numbers = await store.admin.stats()
    await store.close()
    state_bytes = snapshot.nbytes()
    per_turn = written / turns
    return {
        "state_bytes": state_bytes,
        "tokens_per_turn": prompt + reply,
        "checkpoint_tokens": checkpoint_tokens,
        "turns_measured": turns,
        "checkpoints_in_them": intervals,
        "bytes_written_per_turn": per_turn,
        "percent_of_state_per_turn": 100.0 * per_turn / state_bytes,
        "commit_ms_mean": 1000 * elapsed / turns,
        "database_bytes": numbers["page_bytes"],
    }


async def restore_cost(
    folder: Path, shape: ModelShape, *, model: Path | None, strategy: str, replay: int, checkpoint_tokens: int
) -> dict[str, Any]:
    """Hot versus cold: a channel held on the device, and one rebuilt from SQLite."""
    result: dict[str, Any] = {}
    engine = await _load_engine(model, strategy)
    fingerprint = engine.spec.fingerprint if engine is not None else "bench"
    if engine is not None:
        result["model"] = engine.describe()  # its states, of its own shape, are the ones measured
    try:
        if engine is not None:
            snapshot = await engine.read(None, _tokens(random.Random(1), 16))
        else:
            snapshot = shaped_snapshot(shape, fingerprint)
        store = await _open(folder / "restore.sqlite3")
        read = engine.read if engine is not None else _no_model
        states = _states(store, fingerprint, StatePolicy(checkpoint_tokens=checkpoint_tokens), read)
        (whole,) = await store.states.write_states(
            "c", [NewState(StateBase.ZERO, "p", [], 0, fingerprint, checkpoint=snapshot)], {"chat": NewRef(0)}
        )
        loads = []
        for _ in range(5):
            started = time.perf_counter()
            await store.states.load_checkpoint(whole, fingerprint)
            _sync()
            loads.append(time.perf_counter() - started)
        result["state_bytes"] = snapshot.nbytes()
        result["checkpoint_load_ms"] = 1000 * statistics.median(loads)
        states.tiers.put("c", {whole: snapshot})
        hot = []
        for _ in range(100):
            started = time.perf_counter()
            await states.load("c", HeadName.CHAT, [])
            _sync()
            hot.append(time.perf_counter() - started)
        result["hot_load_ms"] = 1000 * statistics.median(hot)
        if engine is not None and replay > 0:
            tokens = _tokens(random.Random(2), replay)
            await store.states.write_states(
                "c",
                [NewState(StateBase.PARENT, "p", tokens, replay, fingerprint, parent=whole)],
                {"chat": NewRef(0)},
            )
            await engine.read(snapshot, tokens)  # warm-up: kernels compiled or tuned on first use
            _sync()
            states.tiers.drop("c")
            started = time.perf_counter()
            await states.load("c", HeadName.CHAT, [])
            _sync()
            cold = time.perf_counter() - started
            speed = replay / max(cold - result["checkpoint_load_ms"] / 1000, 1e-9)
            average = checkpoint_tokens / 2
            result.update(
                replay_tokens=replay,
                cold_load_ms=1000 * cold,
                replay_tokens_per_s=speed,
                average_replay_tokens=average,
                average_cold_load_ms=result["checkpoint_load_ms"] + 1000 * average / speed,
            )
        await store.close()
    finally:
        if engine is not None:
            await engine.close()
    return result


async def scale_cost(
    folder: Path, channels: int, *, turns: int, restores: int, model: Path | None, strategy: str
) -> dict[str, Any]:
    """Many channels: database size, open-and-answer time, and memory under tier budgets."""
    rng = random.Random(3)
    engine = await _load_engine(model, strategy)
    fingerprint = engine.spec.fingerprint if engine is not None else "bench"
    result: dict[str, Any] = {"channels": channels}
    for label, count in (("10_channels", 10), (f"{channels}_channels", channels)):
        path = folder / f"many-{count}.sqlite3"
        store = await _open(path)
        started = time.perf_counter()
        for index in range(count):  # chat turns as the chat stores them: two reads and a line
            chat: int | None = None
            for turn in range(turns):
                prompt, reply = _tokens(rng, 40), _tokens(rng, 120)
                base, replay = (StateBase.PARENT, 160 * turn) if chat else (StateBase.ZERO, 0)
                new = [
                    NewState(base, "p", prompt, replay + 40, fingerprint, parent=chat),
                    NewState(StateBase.PARENT, "p", reply, replay + 160, fingerprint, parent=NewRef(0)),
                ]
                line = Turn("chat", "m" * 160, "r" * 480, 120)
                ids = await store.states.write_states(
                    f"ch{index}", new, {"chat_pre": NewRef(0), "chat": NewRef(1)}, line
                )
                chat = ids[1]
        result[f"fill_s_{label}"] = time.perf_counter() - started
        await store.admin.flush()
        numbers = await store.admin.stats()
        await store.close()
        result[f"database_bytes_{label}"] = numbers["page_bytes"]
        opened = []
        for _ in range(3):
            started = time.perf_counter()
            store = await _open(path)
            heads = await store.states.heads(f"ch{count - 1}")
            await store.states.chain(heads[HeadName.CHAT])
            opened.append(time.perf_counter() - started)
            await store.close()
        result[f"open_and_find_ms_{label}"] = 1000 * statistics.median(opened)
    result["database_bytes_per_channel"] = result[f"database_bytes_{channels}_channels"] / channels
    if engine is not None:
        try:
            state_bytes = (await engine.read(None, [1])).nbytes()
            budget = 20 * 2 * state_bytes  # 20 channels' chat and chat_pre per tier
            policy = StatePolicy(device_bytes=budget, host_bytes=budget)
            store = await _open(path)
            states = _states(store, fingerprint, policy, engine.read)
            touched = rng.sample(range(channels), min(channels, restores))
            started = time.perf_counter()
            rss: list[int] = []
            fifth = len(touched) // 5
            for part in (touched[:fifth], touched[fifth : 3 * fifth], touched[3 * fifth :]):  # 1st: warm-up
                for index in part:
                    await states.load(f"ch{index}", HeadName.CHAT, [])
                rss.append(_rss())
            usage = states.tiers.usage()
            result.update(
                restored_channels=len(touched),
                restore_ms_mean=1000 * (time.perf_counter() - started) / len(touched),
                state_bytes=state_bytes,
                tier_budget_bytes=2 * budget,
                tier_bytes=usage["device_bytes"] + usage["host_bytes"],
                rss_growth_second_two_fifths_bytes=rss[1] - rss[0],
                rss_growth_last_two_fifths_bytes=rss[2] - rss[1],
            )
            await store.close()
            result.update(await _database_budget(path, engine, rng, channels))
        finally:
            await engine.close()
    return result


async def _database_budget(path: Path, engine: Engine, rng: random.Random, channels: int) -> dict[str, Any]:
    """Give a tenth of the channels a checkpoint, then let housekeeping keep a budget of a
    quarter of that: the least recently used channels keep only their transcript."""
    from chat.presets import load_presets
    from chat.session import ChatConfig, ChatService

    store = await _open(path)
    snapshot = await engine.read(None, _tokens(rng, 8))
    for index in rng.sample(range(channels), max(1, channels // 10)):
        state = NewState(StateBase.ZERO, "p", [], 0, engine.spec.fingerprint, checkpoint=snapshot)
        await store.states.write_states(f"ch{index}", [state], {"gen_1": NewRef(0)})
    before = await store.admin.checkpoint_usage()
    budget = before // 4
    config = ChatConfig(default_preset="g1-chat", states=StatePolicy(db_bytes=budget, retention_s=0))
    service = ChatService(engine, store, load_presets(), config)
    started = time.perf_counter()
    done = await service.housekeeping()
    elapsed = time.perf_counter() - started
    numbers = await store.admin.stats()
    await store.close()
    return {
        "checkpoint_bytes_before": before,
        "database_budget_bytes": budget,
        "checkpoint_bytes_after": numbers["checkpoint_bytes"],
        "channels_kept_as_transcript": done["frozen"],
        "housekeeping_s": elapsed,
        "database_file_bytes": numbers["file_bytes"],
    }


async def _load_engine(model: Path | None, strategy: str) -> Engine | None:
    """The model as the bot would load it, or None without one."""
    if model is None:
        return None
    from engine.loading import load_engine

    return await asyncio.to_thread(load_engine, model, strategy)


def _sync() -> None:
    """Wait for queued GPU work, so that a clock stops when the work is done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bench-states``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Measure what storing channel states costs: bytes written per chat turn, "
        "restoring a cold channel against a hot one, and many channels in one database.",
    )
    parser.add_argument("--size", choices=sorted(NAMED_SHAPES), default="1.5B", help="state shape")
    parser.add_argument(
        "--intervals", type=int, default=2, help="checkpoint intervals the writes are counted over"
    )
    parser.add_argument("--prompt-tokens", type=int, default=40, help="tokens a message feeds")
    parser.add_argument("--reply-tokens", type=int, default=120, help="tokens of a reply")
    parser.add_argument("--checkpoint-tokens", type=int, default=65536, help="as the setting")
    parser.add_argument("--model", type=Path, help="an RWKV-7 model to re-read logs with (cold restore)")
    parser.add_argument("--strategy", default="cpu fp32", help="strategy for --model")
    parser.add_argument("--replay", type=int, default=512, help="tokens re-read in the cold restore")
    parser.add_argument("--channels", type=int, default=10_000, help="channels in the scale test")
    parser.add_argument("--scale-model", type=Path, help="a model to restore channels with (memory)")
    parser.add_argument("--restores", type=int, default=1000, help="channels restored in the scale test")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three measurements and print them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, path in (("--model", args.model), ("--scale-model", args.scale_model)):
        if path is not None and not path.is_file():  # before minutes of measuring, not after
            parser.error(f"{option}: no model file at {path}")
    shape = NAMED_SHAPES[args.size]

    async def run() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="rwkv-bench-states-") as tmp:
            folder = Path(tmp)
            writes = await write_cost(
                folder,
                shape,
                intervals=args.intervals,
                prompt=args.prompt_tokens,
                reply=args.reply_tokens,
                checkpoint_tokens=args.checkpoint_tokens,
            )
            _print("writes per chat turn", writes)
            restore = await restore_cost(
                folder,
                shape,
                model=args.model,
                strategy=args.strategy,
                replay=args.replay,
                checkpoint_tokens=args.checkpoint_tokens,
            )
            _print("restoring a channel", restore)
            scale = await scale_cost(
                folder,
                args.channels,
                turns=3,
                restores=args.restores,
                model=args.scale_model,
                strategy=args.strategy,
            )
            _print("many channels", scale)
            return {"size": args.size, "writes": writes, "restore": restore, "scale": scale}

    numbers = asyncio.run(run())
    if args.json is not None:
        args.json.write_text(json.dumps(numbers, indent=2))
    return 0


def _print(title: str, numbers: dict[str, Any]) -> None:
    print(f"\n{title}")
    for name, value in numbers.items():
        shown = (
            f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        )
        print(f"  {name:32} {shown}")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
