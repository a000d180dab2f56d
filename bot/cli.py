"""The ``rwkv-discord`` command line.

This module imports nothing heavy: ``--help``, ``health``, ``faq`` and ``db`` start in a fraction
of a second, and a SIGTERM that arrives while torch or the model is still loading ends the
process at once (as PID 1 in a container it would otherwise wait for Docker's SIGKILL).

Exit codes: 0 done (also a stop by SIGTERM), 1 an unexpected failure, 2 a wrong command line,
78 (EX_CONFIG) a setting, file or token that must be fixed before a restart can help, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from bot.settings import ConfigError, database_location, heartbeat_path, load_settings
from chat.errors import PresetError, StoreError
from engine.errors import EngineError
from engine.shapes import NAMED_SHAPES, SUPPORTED_VERSIONS, ModelShape
from engine.strategy import PRECISIONS

PROG = "rwkv-discord"
EXIT_USAGE = 2
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG: fix the configuration, a restart alone will not help
DB_HELP = (
    "the database: an SQLite file, or postgresql://user@host/db?objects=s3://bucket/prefix "
    "(default: RWKV_DISCORD_DB)"
)
# Subcommands with a parser of their own: name -> (module with main(argv), help line).
PASSTHROUGH = {
    "faq": ("faq.cli", "answer a question from the bundled RWKV FAQ (faq --help for options)"),
    "bench": ("tools.bench", "measure the reference and the batched engine on one model (bench --help)"),
    "bench-states": ("tools.bench_states", "measure state storage: writes per turn, cold restore, scale"),
    "fetch-model": (
        "bot.fetch_model",
        "list RWKV-7 models to download, or fetch one (fetch-model NAME)",
    ),
}


class UsageError(Exception):
    """A wrong command-line value (exit 2, as argparse's own errors)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A Discord bot (and terminal chat) for RWKV language models. Settings come "
        "from RWKV_DISCORD_* environment variables or a .env file; see the README.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_bot_commands(sub)

    for name, (_, text) in PASSTHROUGH.items():  # listed here; run by their own parsers in main()
        sub.add_parser(name, help=text, add_help=False).add_argument("args", nargs=argparse.REMAINDER)

    _add_db_command(sub)
    _add_replicas_command(sub)

    make = sub.add_parser(
        "make-model",
        help="write a random-weight model file (for tests and benchmarks)",
        description="Write an RWKV .pth file with random weights in the real key layout of the "
        "chosen version. Give a size name (RWKV-7 G1 shapes) or --layers/--embd/--vocab.",
    )
    make.add_argument("path", type=Path, help="output file, ending in .pth")
    make.add_argument(
        "--version", type=int, choices=SUPPORTED_VERSIONS, default=7, help="RWKV version (default: 7)"
    )
    make.add_argument("--size", choices=sorted(NAMED_SHAPES), help="a real RWKV-7 shape")
    make.add_argument("--layers", type=int, default=2, help="layers (default: 2)")
    make.add_argument("--embd", type=int, default=64, help="width (default: 64)")
    make.add_argument("--vocab", type=int, default=65536, help="vocabulary size (default: 65536, World)")
    make.add_argument("--dtype", choices=sorted(PRECISIONS), default="fp32", help="stored precision")
    make.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def _add_bot_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``run``, ``health`` and ``chat``."""
    run = sub.add_parser(
        "run",
        help="run the Discord bot",
        description="Connect to Discord with RWKV_DISCORD_TOKEN and answer in the channels that "
        "moderators enabled with /rwkv-mod enable. SIGTERM or Ctrl-C stops it cleanly. Across "
        "processes: give each its --shards of one --shard-count, and RWKV_DISCORD_CLUSTER (a Ray "
        "address) so that they share the gateway's identify slots and the REST budget.",
    )
    run.add_argument("--model", type=Path, help="RWKV .pth file (default: RWKV_DISCORD_MODEL)")
    run.add_argument("--db", type=database_location, help=DB_HELP)
    run.add_argument(
        "--strategy", help="e.g. 'auto', 'cpu fp32', 'cpu int8', 'cuda fp16' (default: RWKV_DISCORD_STRATEGY)"
    )
    run.add_argument(
        "--sync-commands",
        action="store_true",
        default=None,
        help="register the slash commands with Discord (after an upgrade)",
    )
    run.add_argument(
        "--shards",
        metavar="IDS",
        help="this process's shards of a sharded bot, e.g. 0-3 or 0,2,5 (default: RWKV_DISCORD_SHARD_IDS, "
        "or all of --shard-count)",
    )
    run.add_argument(
        "--shard-count",
        type=int,
        metavar="N",
        help="the bot's total shards over all its processes (default: RWKV_DISCORD_SHARD_COUNT; "
        "unset: one connection, unsharded)",
    )

    health = sub.add_parser(
        "health",
        help="exit 0 when a running bot is connected (for Docker's health check)",
        description="Checks the heartbeat file the running bot writes next to its database (each "
        "process of a sharded bot its own: give its shards as run has them, or the same settings).",
    )
    health.add_argument("--db", type=database_location, help=DB_HELP)
    health.add_argument("--max-age", type=float, default=120.0, help="seconds (default: 120)")
    health.add_argument("--shards", help="the shards of the process to check (as given to run)")
    health.add_argument("--shard-count", type=int, help="the bot's shard count (as given to run)")

    chat = sub.add_parser(
        "chat",
        help="chat with the model in the terminal",
        description="Chat in the terminal with the RWKV chat grammar (+help lists it), on the "
        "same database as the bot. With --jsonl: one message per input line, one JSON object "
        "per message on stdout.",
    )
    chat.add_argument("--model", type=Path, help="RWKV .pth file (default: RWKV_DISCORD_MODEL)")
    chat.add_argument("--db", type=database_location, help=DB_HELP)
    chat.add_argument("--channel", default="console", help="conversation name (default: console)")
    chat.add_argument(
        "--strategy", help="e.g. 'auto', 'cpu fp32', 'cpu int8', 'cuda fp16' (default: RWKV_DISCORD_STRATEGY)"
    )
    chat.add_argument(
        "--engine",
        choices=("auto", "batched", "reference"),
        help="auto (default): batched for RWKV-7, the rwkv package for RWKV-4 to 6",
    )
    chat.add_argument("--tokenizer", help="auto, world, or a tokenizer.json path")
    chat.add_argument("--preset", help="default prompt preset (default: RWKV_DISCORD_PRESET)")
    chat.add_argument("--seed", type=int, help="seed for reproducible sampling")
    chat.add_argument(
        "--jsonl",
        action="store_true",
        help="one message per input line, one JSON object per message out (for scripts)",
    )


def _add_db_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``db`` and its actions."""
    db = sub.add_parser(
        "db",
        help="look after the database: stats, check, vacuum, export a transcript, back up, purge",
        description="Housekeeping of the database (RWKV_DISCORD_DB or --db). Safe while "
        "the bot runs, except vacuum, which waits for exclusive access, and purge, which is for a "
        "stopped bot (the running bot purges deleted channels itself).",
    )
    db.add_argument("--db", type=database_location, help=DB_HELP)
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    stats = db_sub.add_parser("stats", help="sizes and counts")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    db_sub.add_parser("vacuum", help="give free pages back to the file system")
    db_sub.add_parser("check", help="check every page of the database (exit 1 when damaged)")
    export = db_sub.add_parser("export", help="a channel's transcript as text, for moderators")
    export.add_argument("--channel", required=True, help="the channel (or thread) id, or 'console'")
    export.add_argument("--output", type=Path, help="write to this file instead of stdout")
    backup_parser = db_sub.add_parser("backup", help="a consistent copy of the live database")
    backup_parser.add_argument("destination", type=Path, help="the backup file to write")
    purge = db_sub.add_parser("purge", help="delete everything stored for a channel")
    purge.add_argument("--channel", required=True, help="the channel (or thread) id, or 'console'")


def _add_replicas_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bot.replicas import add_command

    add_command(sub)


def _replicas(args: argparse.Namespace) -> int:
    from bot.replicas import run

    _logging("WARNING")
    return run(args, load_settings())


def _make_model(args: argparse.Namespace) -> int:
    from engine.strategy import dtype as torch_dtype
    from tools.make_model import write_random_model

    if args.path.suffix != ".pth":
        raise UsageError(f"the output file must end in .pth: {args.path}")
    if not args.path.parent.is_dir() or not os.access(args.path.parent, os.W_OK):
        raise UsageError(f"cannot write {args.path}: its folder does not exist or is not writable")
    shape = NAMED_SHAPES[args.size] if args.size else ModelShape(args.layers, args.embd, args.vocab)
    dtype = torch_dtype(args.dtype)
    try:
        write_random_model(args.path, args.version, shape, seed=args.seed, dtype=dtype)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot write {args.path}: {exc.strerror or exc}") from exc
    except RuntimeError as exc:  # torch's file writer reports the file system's refusal so
        raise UsageError(f"cannot write {args.path}: the file system refused it") from exc
    size_mb = args.path.stat().st_size / 1e6
    print(
        f"wrote {args.path}: RWKV-{args.version} L{shape.n_layer} D{shape.n_embd} "
        f"vocab {shape.vocab_size}, {args.dtype}, {size_mb:.1f} MB"
    )
    return 0


def _chat(args: argparse.Namespace) -> int:
    from bot.app import open_chat
    from bot.console import run_console

    settings = load_settings(
        model=args.model,
        db=args.db,
        strategy=args.strategy,
        tokenizer=args.tokenizer,
        preset=args.preset,
        seed=args.seed,
        engine=args.engine,
    )
    _logging(settings.log_level)

    async def main() -> int:
        async with open_chat(settings) as service:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            # SIGTERM (docker stop) cuts the reply being written, which is stored as far as it
            # got, and ends the chat: exit 0 within Docker's 10 seconds.
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            try:
                return await run_console(service, args.channel, args.jsonl, stop=stop)
            finally:
                loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(main())


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _run(args: argparse.Namespace) -> int:
    from bot.runner import run_bot

    settings = load_settings(
        model=args.model,
        db=args.db,
        strategy=args.strategy,
        sync_commands=args.sync_commands,
        shard_ids=args.shards,
        shard_count=args.shard_count,
    )
    if settings.token is None:
        raise ConfigError(
            "RWKV_DISCORD_TOKEN is not set: set it to your bot token from the Discord developer portal "
            "(Applications > your bot > Bot > Reset Token), or use `rwkv-discord chat` for the terminal chat"
        )
    _logging(settings.log_level)
    return asyncio.run(run_bot(settings))


def _db(args: argparse.Namespace) -> int:
    from chat.storage import backend_for

    settings = load_settings(db=args.db)
    path = settings.db
    backend = backend_for(path)
    if args.db_command == "check":
        problems = backend.integrity_check(path)
        if problems:
            print(f"{path} is damaged:", *problems, sep="\n  ", file=sys.stderr)
            return 1
        print(f"{path}: no problems found")
        return 0
    if args.db_command == "backup":
        if args.destination.is_dir():
            raise UsageError(f"give the backup a file name, not a folder: {args.destination}/backup.sqlite3")
        backend.backup(path, args.destination)
        print(f"backed up {path} to {args.destination} ({args.destination.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.db_command == "vacuum":
        before, after = backend.vacuum(path)
        print(f"vacuumed {path}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
        return 0
    if isinstance(path, Path) and not path.exists():
        raise ConfigError(f"RWKV_DISCORD_DB is wrong (no database at {path}): give the bot's database file")

    async def read() -> int:
        # No start-up check here: a damaged database can still be looked at and exported.
        store = await backend.open(path, check=False)
        try:
            if args.db_command == "stats":
                numbers = await store.admin.stats()
                if args.json:
                    print(json.dumps(numbers))
                else:
                    for name, value in numbers.items():
                        print(f"{name:24} {value}")
                return 0
            if args.db_command == "purge":
                if not await store.admin.purge_channel(args.channel):
                    print(f"nothing stored for channel {args.channel}", file=sys.stderr)
                    return 1
                print(f"purged channel {args.channel}")
                return 0
            turns = await store.transcripts.turns(args.channel)
            if not turns:
                print(f"no transcript for channel {args.channel}", file=sys.stderr)
                return 1
            lines = []
            for turn in turns:
                lines.append(f"[{turn.command}] {turn.user_text}".rstrip())
                if turn.reply_text:
                    lines.append(turn.reply_text)
                lines.append("")
            text = "\n".join(lines)
            if args.output is not None:
                args.output.write_text(text, encoding="utf-8")
            else:
                print(text)
            return 0
        finally:
            await store.close()

    return asyncio.run(read())


def _health(args: argparse.Namespace) -> int:
    settings = load_settings(db=args.db, shard_ids=args.shards, shard_count=args.shard_count)
    path = heartbeat_path(settings)
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        print(f"unhealthy: no heartbeat at {path}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"unhealthy: last heartbeat {age:.0f} s ago", file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {age:.0f} s ago")
    return 0


@contextlib.contextmanager
def _quick_exit_on_sigterm() -> Iterator[None]:
    """Until a command installs its own handler: SIGTERM ends the process at once, exit 0.

    Nothing is open yet while torch and the model load, so there is nothing to finish; the bot
    and the terminal chat replace this with a handler that finishes cleanly.
    """

    def leave(signum: int, frame: FrameType | None) -> None:
        os.write(2, f"{PROG}: stopped by {signal.Signals(signum).name} while starting\n".encode())
        os._exit(0)

    try:
        previous = signal.signal(signal.SIGTERM, leave)
    except ValueError:  # not the main thread (tests): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module's docstring)."""
    with _quick_exit_on_sigterm():
        return _main(sys.argv[1:] if argv is None else argv)


def _main(argv: list[str]) -> int:
    try:
        if argv[:1] and argv[0] in PASSTHROUGH:  # own parsers, so `faq --help`, `faq -- -temp` work
            module = importlib.import_module(PASSTHROUGH[argv[0]][0])
            return int(module.main(argv[1:]))
        args = build_parser().parse_args(argv)
        if args.command == "make-model":
            return _make_model(args)
        if args.command == "run":
            return _run(args)
        if args.command == "health":
            return _health(args)
        if args.command == "db":
            return _db(args)
        if args.command == "replicas":
            return _replicas(args)
        return _chat(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        # A full disk, a lock held by another program, a disk error, a database server not
        # reachable yet or a channel taken by another replica may pass: a restart can help
        # (exit 1); a damaged, unreadable or newer database needs the owner (exit 78).
        return 1 if exc.problem in ("full", "locked", "disk", "unreachable", "fenced") else EXIT_CONFIG
    except (ConfigError, EngineError, PresetError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a file the command was asked to read or write
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Never a bare traceback for an owner; the whole story with RWKV_DISCORD_LOG_LEVEL=DEBUG.
        if os.environ.get("RWKV_DISCORD_LOG_LEVEL", "").upper() == "DEBUG":
            raise
        print(
            f"{PROG}: unexpected error ({type(exc).__name__}: {exc}); run again with "
            "RWKV_DISCORD_LOG_LEVEL=DEBUG to see where, and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
