"""Faults and bad input an owner meets: each gets one clear answer and changes nothing stored.

Real parts throughout: damaged, full and read-only SQLite files made by SQLite itself, model
files without read permission for the user the bot runs as, the command line in subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.cli import EXIT_CONFIG, main
from chat.errors import PresetError, StoreError
from chat.presets import parse_preset
from chat.session import ChatService
from chat.storage.sqlite import SqliteStorage
from engine.formats import load_weights
from engine.inprocess import ReferenceEngine
from tests.conftest import open_service

CLI = [sys.executable, "-m", "bot"]
NOBODY = 65534


def damage_table(db: Path, table: str) -> None:
    """Overwrite the root page of a table with junk, as a failing disk would."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root, page_size = conn.execute(
        "SELECT rootpage, (SELECT page_size FROM pragma_page_size()) FROM sqlite_master WHERE name = ?",
        (table,),
    ).fetchone()
    conn.close()
    with db.open("r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(bytes([0xA5]) * page_size)


async def filled_store(db: Path, channels: int = 50) -> None:
    store = await SqliteStorage.open(db)
    for index in range(channels):
        await store.channels.set_settings(f"c{index}", {"temperature": 1.0 + index / 100})
    await store.close()


# ---------------------------------------------------------------------------- damaged database


async def test_a_damaged_page_is_found_at_start(tmp_path: Path) -> None:
    """The start-up check finds a damaged page: one line that says so and how to restore, and
    never a suggestion to delete."""
    db = tmp_path / "bot.sqlite3"
    await filled_store(db)
    damage_table(db, "channels")
    with pytest.raises(StoreError) as info:
        await SqliteStorage.open(db)
    message = str(info.value)
    assert info.value.problem == "damaged"
    assert "damaged" in message and "backup" in message and "\n" not in message
    assert "delete" not in message


def test_db_stats_and_chat_on_a_damaged_database_answer_in_one_line(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``db stats`` and the terminal chat on a damaged database end with one line, not a
    traceback; ``db check`` names the damage."""
    db = tmp_path / "bot.sqlite3"
    asyncio.run(filled_store(db))
    damage_table(db, "channels")
    assert main(["db", "--db", str(db), "stats"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkv-discord: error:") and "damaged" in err and "\n" not in err
    assert main(["db", "--db", str(db), "check"]) == 1
    assert "damaged" in capsys.readouterr().err
    assert main(["chat", "--model", str(model_dir / "v7.pth"), "--db", str(db)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "damaged" in err and "Traceback" not in err


async def test_db_check_passes_a_sound_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``db check`` on a sound database says so and exits 0."""
    db = tmp_path / "bot.sqlite3"
    await filled_store(db, channels=3)
    assert await asyncio.to_thread(main, ["db", "--db", str(db), "check"]) == 0
    assert "no problems" in capsys.readouterr().out


# ---------------------------------------------------------------------------- full and read-only


async def test_a_full_disk_is_said_to_be_full_and_changes_nothing(
    engine7: ReferenceEngine, tmp_path: Path
) -> None:
    """With the database unable to grow (SQLite's own "database or disk is full"), a message gets
    an answer that says the disk is full, the conversation is unchanged, and closing the store
    does not raise."""
    service = await open_service(engine7, tmp_path / "full.sqlite3")
    try:
        first = await service.respond("c", "-top_p=0 Hello")
        assert first.kind == "reply"
        before = await service.store.states.heads("c")
        await service.store.database.db.execute("VACUUM")  # no free pages left to reuse
        pages = await service.store.database.fetchone("PRAGMA page_count", ())
        await service.store.database.db.execute(f"PRAGMA max_page_count = {int(pages[0])}")
        refused = await service.respond("c", "-top_p=0 " + "tell me a long story " * 300)
        assert refused.kind == "error"
        assert "full" in refused.text and "delete" not in refused.text
        assert await service.store.states.heads("c") == before
        with pytest.raises(StoreError) as info:
            await service.store.channels.set_guild_settings("other", {"x": "y" * 100_000})
        assert info.value.problem == "full"
    finally:
        await service.store.close()  # must not raise
    reopened = await SqliteStorage.open(tmp_path / "full.sqlite3")
    try:
        assert len(await reopened.transcripts.turns("c")) == 1
    finally:
        await reopened.close()


async def test_a_read_only_database_is_said_to_be_read_only(engine7: ReferenceEngine, tmp_path: Path) -> None:
    """A database that cannot be written (SQLite's own read-only error) is named as read-only,
    with the user who needs access; nothing suggests deleting it; close does not raise."""
    service = await open_service(engine7, tmp_path / "ro.sqlite3")
    try:
        await service.respond("c", "-top_p=0 Hello")
        await service.store.database.db.execute("PRAGMA query_only = 1")
        refused = await service.respond("c", "-top_p=0 again")
        assert refused.kind == "error" and "read-only" in refused.text and "uid" in refused.text
        assert "delete" not in refused.text
        with pytest.raises(StoreError) as info:
            await service.store.channels.set_settings("c", {})
        assert info.value.problem == "read-only"
    finally:
        await service.store.close()


def error_as_unprivileged_user(work: Callable[[], object]) -> str:
    """Run ``work`` as an unprivileged user (the bot's user in the container) and return the
    message of the error it raises. As root, the kernel's permission checks would not apply, so
    a forked child drops to ``nobody`` first (everything it needs is imported already)."""
    if os.getuid() != 0:
        try:
            work()
        except Exception as exc:
            return str(exc)
        return ""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        message = ""
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            work()
        except BaseException as exc:
            message = str(exc) or type(exc).__name__
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter (pytest's own are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="rwkv-faults-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_DISCORD_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def test_an_unreadable_model_is_named_as_a_permission_problem(model_dir: Path, open_folder: Path) -> None:
    """A model file the bot's user may not read is reported as that, with the fix, not as a
    truncated or corrupt file."""
    model = open_folder / "model.pth"
    shutil.copy(model_dir / "v7.pth", model)
    model.chmod(0o600 if os.getuid() == 0 else 0o000)
    message = error_as_unprivileged_user(lambda: load_weights(model))
    assert "not readable by" in message and "uid" in message and "corrupt" not in message


def test_a_database_folder_owned_by_another_user_names_the_user(open_folder: Path) -> None:
    """A database folder the bot's user may not write (a root-owned bind mount) is reported with
    the user who needs access, not as "unable to open database file"."""
    data = open_folder / "data"
    data.mkdir(mode=0o755)
    if os.getuid() != 0:
        data.chmod(0o555)
    message = error_as_unprivileged_user(lambda: asyncio.run(SqliteStorage.open(data / "bot.sqlite3")))
    assert "may not write in" in message and "uid" in message and str(data) in message
    assert "unable to open database file" not in message


# ---------------------------------------------------------------------------- stored settings


@pytest.mark.parametrize(
    "stored",
    [
        "{not json",
        '["a", "list"]',
        '{"temperature": "hot", "top_p": 7, "max_tokens": "many", "thinking": 3, "faq_auto": "yes"}',
        '{"temperature": NaN, "presence_penalty": Infinity, "preset": 5}',
    ],
)
async def test_a_stored_setting_that_does_not_parse_leaves_the_channel_working(
    service: ChatService, stored: str
) -> None:
    """Settings stored wrong (by hand, or damaged) are read as the defaults: the channel answers,
    with the default sampling."""
    await service.update_settings("c", temperature=0.5)
    await service.store.database.db.execute(
        "UPDATE channels SET settings = ? WHERE channel_id = 'c'", (stored,)
    )
    assert await service.channel_settings("c") == {}
    outcome = await service.respond("c", "Hello")
    assert outcome.kind == "reply"
    assert outcome.sampling is not None and outcome.sampling["temperature"] == 1.0
    assert (await service.update_settings("c", top_p=0.5)) == ["top_p 0.5"]
    assert await service.channel_settings("c") == {"top_p": 0.5}


async def test_a_stored_server_setting_that_does_not_parse_reads_as_none(tmp_path: Path) -> None:
    """A server's damaged settings read as none instead of failing every message there."""
    store = await SqliteStorage.open(tmp_path / "s.sqlite3")
    try:
        await store.channels.set_guild_settings("g", {"reset_policy": "moderators"})
        await store.database.db.execute("UPDATE guild_settings SET settings = '{oops'")
        assert await store.channels.guild_settings("g") == {}
    finally:
        await store.close()


# ---------------------------------------------------------------------------- presets


PRESET = 'user = "User"\nbot = "Assistant"\ninit_prompt = "Hi"\n'


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("[sampling]\ntemperature = nan\n", "temperature"),
        ("[sampling]\ntop_p = inf\n", "top_p"),
        ("[sampling]\ntemperature = 9.0\n", "between"),
        ("[sampling]\ntop_p = -0.1\n", "between"),
        ("[sampling]\npresence_penalty = 3\n", "between"),
        ("[sampling]\npenalty_decay = 0\n", "penalty_decay"),
        ('[sampling]\ntemperature = "0.5"\n', "number"),
        ("[sampling]\ntemperature = true\n", "number"),
        ("[sampling]\ntemprature = 0.5\n", "temprature"),
        ('thinking = "false"\n', "true or false"),
        ("thinking = 1\n", "true or false"),
        ("separator = 3\n", "separator"),
        ('colour = "blue"\n', "colour"),
        ("sampling = 5\n", "table"),
    ],
)
def test_presets_are_validated_as_strictly_as_settings(extra: str, named: str) -> None:
    """Non-finite or out-of-range numbers, wrong types, strings as booleans and unknown keys are
    refused with a message naming the value."""
    with pytest.raises(PresetError) as info:
        parse_preset("mine", PRESET + extra)
    assert named in str(info.value)


def test_a_valid_preset_keeps_its_values() -> None:
    """A correct preset loads with its own numbers (and the defaults for the rest)."""
    preset = parse_preset("mine", PRESET + "thinking = true\n[sampling]\ntemperature = 0.7\ntop_p = 0\n")
    assert preset.thinking is True
    assert preset.sampling.temperature == 0.7 and preset.sampling.top_p == 0.0
    assert math.isclose(preset.sampling.penalty_decay, 0.996)


# ---------------------------------------------------------------------------- command line


def test_terminal_chat_survives_invalid_utf8_input(model_dir: Path, tmp_path: Path) -> None:
    """With strict UTF-8 decoding of stdin (a normal desktop locale), a line with an invalid byte
    is answered like any other, and the chat goes on."""
    env = cli_env()
    env.update(PYTHONIOENCODING="utf-8:strict", RWKV_DISCORD_CHAT_MAX_TOKENS="8")
    result = subprocess.run(
        [*CLI, "chat", "--model", str(model_dir / "v7.pth"), "--db", str(tmp_path / "db.sqlite3"), "--jsonl"],
        input=b"+help\nHello \xff\xfe there\n+reset\n",
        capture_output=True,
        timeout=120,
        env=env,
        check=True,
    )
    kinds = [json.loads(line)["kind"] for line in result.stdout.decode().splitlines()]
    assert kinds == ["help", "reply", "notice"]


def test_bench_states_with_a_missing_model_is_one_line(tmp_path: Path) -> None:
    """bench-states checks its model files before measuring, and says which is missing."""
    result = subprocess.run(
        [*CLI, "bench-states", "--model", str(tmp_path / "missing.pth")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert result.returncode == 2
    assert "--model: no model file at" in result.stderr and "Traceback" not in result.stderr


def test_light_commands_do_not_import_torch() -> None:
    """--help, health, faq and db start without torch or the model code (fast, small: the
    health check runs every minute in the container)."""
    probe = (
        "import sys, bot.cli\n"
        "for argv in (['--help'], ['health'], ['faq', 'license'], ['db', 'stats']):\n"
        "    try:\n"
        "        bot.cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    env = cli_env()
    env["RWKV_DISCORD_DB"] = "/nonexistent/db.sqlite3"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/",
    )
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr


def start_chat(
    model: Path, db: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The terminal chat in a process of its own, its pipes open."""
    return subprocess.Popen(
        [*CLI, "chat", "--model", str(model), "--db", str(db), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or cli_env(),
    )


def stop_by_sigterm(process: subprocess.Popen[bytes], within: float) -> tuple[bytes, bytes]:
    """SIGTERM, as ``docker stop`` sends it; the process must exit 0 within ``within`` seconds."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert time.monotonic() - started < within
    assert b"Traceback" not in err
    return out, err


def test_sigterm_right_after_start_ends_the_process_at_once(model_dir: Path, tmp_path: Path) -> None:
    """A SIGTERM while torch and the model load (``docker stop`` just after start) ends the
    process at once with 0, not after Docker's 10 s and a SIGKILL."""
    process = start_chat(model_dir / "v7.pth", tmp_path / "db.sqlite3")
    # The interpreter itself takes a moment to start (longer on a busy machine); the command
    # line's own handler is in place a fraction of a second later, before torch is imported.
    status = Path(f"/proc/{process.pid}/status")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        caught = next(line for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.005)
    stop_by_sigterm(process, within=3.0)


def test_sigterm_mid_reply_stores_the_cut_reply_and_exits_0(model_dir: Path, tmp_path: Path) -> None:
    """A SIGTERM while the terminal chat writes a reply cuts it, stores it as far as it got, and
    exits 0 at once, without waiting for more input."""
    env = cli_env()
    env["RWKV_DISCORD_CHAT_MAX_TOKENS"] = "4096"
    db = tmp_path / "db.sqlite3"
    process = start_chat(model_dir / "v7.pth", db, "--jsonl", "--seed", "1", env=env)
    assert process.stdin is not None and process.stderr is not None
    process.stdin.write(b"-temp=3 -top_p=1 a very long story please\n")
    process.stdin.flush()  # and the input stays open: the chat would wait for more
    while b"ready:" not in process.stderr.readline():
        pass
    time.sleep(1.5)
    out, _ = stop_by_sigterm(process, within=5.0)
    reply = json.loads(out.decode().splitlines()[0])
    assert reply["stop_reason"] == "cancelled" and reply["tokens"]
    turns = sqlite3.connect(db).execute("SELECT reply_tokens FROM turns").fetchall()
    assert turns == [(len(reply["tokens"]),)]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["db", "export", "--channel", "console", "--output", "/nonexistent/folder/out.txt"], "No such file"),
        (["db", "backup", "{tmp}"], "not a folder"),
        (["make-model", "/proc/new.pth"], "cannot write"),
    ],
)
def test_file_trouble_on_the_command_line_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    """A path the command cannot write is one line, never a traceback."""
    db = tmp_path / "bot.sqlite3"
    asyncio.run(filled_store(db, channels=1))
    conn = sqlite3.connect(db)  # a transcript line to export
    conn.execute(
        "INSERT INTO turns (channel_id, command, user_text, reply_text, reply_tokens, model_fingerprint,"
        " created_at) VALUES ('console', 'chat', 'hi', 'hello', 1, 'x', 0)"
    )
    conn.commit()
    conn.close()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "db":
        argv = ["db", "--db", str(db), *argv[1:]]
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_a_missing_model_file_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model path with no file behind it says where to put one and how to download one."""
    missing = tmp_path / "models" / "model.pth"
    assert main(["chat", "--model", str(missing), "--db", str(tmp_path / "db.sqlite3")]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "no file at" in err and "fetch-model" in err and "\n" not in err


def test_a_damaged_database_is_said_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is checked before the model loads (minutes for a large model), so a damaged
    file is said at once: the model is never loaded."""
    db = tmp_path / "bot.sqlite3"
    asyncio.run(filled_store(db))
    damage_table(db, "channels")
    model = tmp_path / "model.pth"
    model.write_bytes(b"not read")
    loads: list[object] = []
    monkeypatch.setattr("bot.app.load_engine", loads.append)
    assert main(["chat", "--model", str(model), "--db", str(db)]) == EXIT_CONFIG
    assert "damaged" in capsys.readouterr().err and loads == []


@pytest.mark.parametrize(
    ("problem", "status"),
    [("full", 1), ("locked", 1), ("disk", 1), ("damaged", EXIT_CONFIG), ("read-only", EXIT_CONFIG)],
)
def test_database_trouble_that_may_pass_is_not_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], problem: str, status: int
) -> None:
    """A full disk, a lock held by another program or a disk error exit 1 (Docker's policy
    restarts the bot, and it goes on once the trouble passed); a damaged or read-only database
    exits 78, which the image holds until the owner fixes it."""

    def failing(args: object) -> int:
        raise StoreError(f"the database is {problem}", problem)  # type: ignore[arg-type]

    monkeypatch.setattr("bot.cli._db", failing)
    assert main(["db", "stats"]) == status
    assert capsys.readouterr().err.strip() == f"rwkv-discord: error: the database is {problem}"
