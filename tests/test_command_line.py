"""The rwkv-discord command line, run as a user would: real processes, real files."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bot.cli import EXIT_CONFIG, main
from bot.settings import ConfigError, Settings, heartbeat_path, load_settings
from engine.formats import inspect_model

CLI = [sys.executable, "-m", "bot"]


def chat_env() -> dict[str, str]:
    """The environment without the user's settings, with short replies (random models never
    end a turn by themselves, so a reply would run to the 999-token cap)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_DISCORD_")}
    env.update(RWKV_DISCORD_CHAT_MAX_TOKENS="40", RWKV_DISCORD_GEN_MAX_TOKENS="20")
    return env


def run_chat(model: Path, db: Path, messages: list[str], *extra: str) -> list[dict[str, object]]:
    """Run ``chat --jsonl`` over the messages; one JSON object per message comes back."""
    result = subprocess.run(
        [*CLI, "chat", "--model", str(model), "--db", str(db), "--jsonl", *extra],
        input="\n".join(messages) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=chat_env(),
        check=True,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == len(messages), result.stderr[-2000:]
    return [json.loads(line) for line in lines]


def test_jsonl_output_has_one_object_per_message(model_dir: Path, tmp_path: Path) -> None:
    """Every input line gives exactly one JSON object with kind, text and, for model output,
    the sampling used and the token ids."""
    messages = ["Hello", "+gen -temp=0.9 Once", "-temp=abc", "+reset", "", "+nope", "+", "+faq license"]
    out = run_chat(model_dir / "v7.pth", tmp_path / "db.sqlite3", messages, "--seed", "3")
    kinds = [o["kind"] for o in out]
    assert kinds == ["reply", "generation", "error", "notice", "help", "help", "notice", "faq"]
    assert out[1]["sampling"]["temperature"] == 0.9  # type: ignore[index]
    assert all(isinstance(t, int) for t in out[0]["tokens"])  # type: ignore[attr-defined]
    assert "Apache" in str(out[7]["text"])


def test_seed_makes_sampling_reproducible(model_dir: Path, tmp_path: Path) -> None:
    """The same --seed gives the same sampled tokens; another seed differs."""
    messages = ["-temp=1.5 -top_p=1 Hi", "+gen -temp=1.5 -top_p=1 A"]
    a = run_chat(model_dir / "v7.pth", tmp_path / "a.sqlite3", messages, "--seed", "5")
    b = run_chat(model_dir / "v7.pth", tmp_path / "b.sqlite3", messages, "--seed", "5")
    c = run_chat(model_dir / "v7.pth", tmp_path / "c.sqlite3", messages, "--seed", "6")
    assert [o["tokens"] for o in a] == [o["tokens"] for o in b]
    assert [o["tokens"] for o in a] != [o["tokens"] for o in c]


def test_greedy_conversation_survives_restarts(model_dir: Path, tmp_path: Path) -> None:
    """With -top_p=0, a conversation split across program restarts gives the same replies."""
    messages = ["-top_p=0", "Hi there", "+gen A story", "What is RWKV?", "+++", "+", "+qa Why?", "Bye"]
    whole = run_chat(model_dir / "v7.pth", tmp_path / "whole.sqlite3", messages)
    split_db = tmp_path / "split.sqlite3"
    parts = (
        run_chat(model_dir / "v7.pth", split_db, messages[:2])
        + run_chat(model_dir / "v7.pth", split_db, messages[2:5])
        + run_chat(model_dir / "v7.pth", split_db, messages[5:])
    )
    assert [o.get("tokens") for o in parts] == [o.get("tokens") for o in whole]
    assert [o["text"] for o in parts] == [o["text"] for o in whole]
    assert [o["kind"] for o in whole][1:] == [
        "reply",
        "generation",
        "reply",
        "generation",
        "reply",
        "generation",
        "reply",
    ]


def test_kill_leaves_every_answered_turn(model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL during a conversation: every answered turn is stored and the file is sound."""
    db = tmp_path / "kill.sqlite3"
    answered = 0
    for attempt in range(3):
        proc = subprocess.Popen(
            [
                *CLI,
                "chat",
                "--model",
                str(model_dir / "v7.pth"),
                "--db",
                str(db),
                "--jsonl",
                "--channel",
                "k",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=chat_env(),
        )
        assert proc.stdin is not None and proc.stdout is not None
        for i in range(2 + attempt):
            proc.stdin.write(f"message {attempt}-{i}\n")
            proc.stdin.flush()
            json.loads(proc.stdout.readline())
            answered += 1
        proc.stdin.write("one more that may or may not finish\n")
        proc.stdin.flush()
        time.sleep(0.05 + 0.1 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = conn.execute("SELECT user_text FROM turns WHERE channel_id = 'k'").fetchall()
        conn.close()
        assert answered <= len(stored) <= answered + attempt + 1
    after = run_chat(model_dir / "v7.pth", db, ["And now?"], "--channel", "k")
    assert after[0]["kind"] == "reply"


def test_missing_model_setting_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a model, start-up says which variable to set and how to get a model, in one line,
    exit 78 (a configuration error: restarting will not help)."""
    monkeypatch.delenv("RWKV_DISCORD_MODEL", raising=False)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    assert main(["chat"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "RWKV_DISCORD_MODEL" in err and "fetch-model" in err


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("RWKV_DISCORD_STRATEGY", "gpu fast", "RWKV_DISCORD_STRATEGY"),
        ("RWKV_DISCORD_MAX_INPUT_TOKENS", "lots", "RWKV_DISCORD_MAX_INPUT_TOKENS"),
        ("RWKV_DISCORD_GEN_MAX_TOKENS", "0", "RWKV_DISCORD_GEN_MAX_TOKENS"),
        ("RWKV_DISCORD_PRESETS_DIR", "/no/such/folder", "RWKV_DISCORD_PRESETS_DIR"),
        ("RWKV_DISCORD_LOG_LEVEL", "LOUD", "RWKV_DISCORD_LOG_LEVEL"),
    ],
)
def test_wrong_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    """A wrong setting stops start-up with one line naming it and the fix."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert named in message and "\n" not in message and ":" in message


@pytest.mark.parametrize(
    ("argv", "named", "why"),
    [
        (["--shards", "0-3", "--shard-count", "2"], "RWKV_DISCORD_SHARD_IDS", "shard 3 is past the last"),
        (["--shards", "3-1", "--shard-count", "16"], "RWKV_DISCORD_SHARD_IDS", "runs backwards"),
        (["--shards", "0-x", "--shard-count", "16"], "RWKV_DISCORD_SHARD_IDS", "'0-x' is not a shard id"),
        (["--shards", "0-3"], "RWKV_DISCORD_SHARD_IDS", "RWKV_DISCORD_SHARD_COUNT is not set"),
        (["--shard-count", "0"], "RWKV_DISCORD_SHARD_COUNT", "greater than or equal to 1"),
    ],
)
def test_wrong_shards_are_one_configuration_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], named: str, why: str
) -> None:
    """Shards outside the count, a bad range or a count below 1 stop `run` with one line naming
    the setting, exit 78, before anything loads."""
    monkeypatch.setenv("RWKV_DISCORD_TOKEN", "a-token")
    assert main(["run", *argv]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and named in err and why in err


def test_run_takes_its_shards_from_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --shards 0-3 --shard-count 16` overrides the shard settings of the environment, and
    the other settings of the cluster come from it."""
    from bot import runner

    seen: list[Settings] = []

    async def run_bot(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(runner, "run_bot", run_bot)
    monkeypatch.setenv("RWKV_DISCORD_TOKEN", "a-token")
    monkeypatch.setenv("RWKV_DISCORD_SHARD_IDS", "5")
    monkeypatch.setenv("RWKV_DISCORD_SHARD_COUNT", "8")
    monkeypatch.setenv("RWKV_DISCORD_CLUSTER", "ray://head:10001")
    monkeypatch.setenv("RWKV_DISCORD_REST_RATE", "40")
    assert main(["run", "--shards", "0-3", "--shard-count", "16"]) == 0
    (settings,) = seen
    assert (settings.shard_ids, settings.shard_count) == ("0,1,2,3", 16)
    assert (settings.cluster, settings.cluster_app, settings.rest_rate) == (
        "ray://head:10001",
        "rwkv-chat",
        40,
    )
    assert main(["run"]) == 0 and (seen[1].shard_ids, seen[1].shard_count) == ("5", 8)


def test_a_database_server_location_stays_a_location(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A postgresql:// database (setting or --db) is not turned into a path, its heartbeat goes
    to the temporary folder, and a server that does not answer is one line and exit 1 (it may
    come up: a restart helps), not the configuration's 78."""
    location = "postgresql://bot@127.0.0.1:9/rwkv?objects=s3://states/prod"
    monkeypatch.setenv("RWKV_DISCORD_DB", location)
    settings = load_settings()
    assert settings.db == location
    assert heartbeat_path(settings).parent == Path(tempfile.gettempdir())
    assert isinstance(load_settings(db=Path("data/x.sqlite3")).db, Path)
    pytest.importorskip("asyncpg")
    assert main(["db", "--db", location, "stats"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkv-discord: error: cannot connect to Postgres at 127.0.0.1:9")
    assert "\n" not in err


@pytest.mark.parametrize(
    "case",
    [
        ({}, ["replicas", "status"], "RWKV_DISCORD_CLUSTER is not set"),
        ({"RWKV_DISCORD_CLUSTER": "auto"}, ["replicas", "start", "0"], "give at least 1 replica, not 0"),
        (
            {"RWKV_DISCORD_CLUSTER": "auto", "RWKV_DISCORD_MODEL": "MODEL"},
            ["replicas", "start", "2"],
            "RWKV_DISCORD_DB is an SQLite file",
        ),
    ],
)
def test_replicas_settings_are_checked_before_any_cluster_is_joined(
    case: tuple[dict[str, str], list[str], str],
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``replicas`` without a cluster, with no replica, or with an SQLite database (which replicas
    on several machines cannot share) is one configuration line, exit 78, before Ray starts."""
    environment, argv, said = case
    for name in [n for n in os.environ if n.startswith("RWKV_DISCORD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RWKV_DISCORD_DB", str(tmp_path / "bot.sqlite3"))
    for name, value in environment.items():
        monkeypatch.setenv(name, str(model_dir / "v7.pth") if value == "MODEL" else value)
    assert main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert said in err and "\n" not in err
    assert "cluster.serve" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_broken_model_at_start_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A broken model file gives one error line and exit status 78, not a traceback."""
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x00" * 1000)
    assert main(["chat", "--model", str(broken), "--db", str(tmp_path / "db.sqlite3")]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.startswith("rwkv-discord: error:") and "\n" not in err


def test_make_model_writes_a_loadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """make-model writes the requested version and shape."""
    path = tmp_path / "m.pth"
    assert (
        main(["make-model", str(path), "--version", "6", "--layers", "3", "--embd", "128", "--vocab", "1000"])
        == 0
    )
    spec = inspect_model(path)
    assert (spec.version, spec.n_layer, spec.n_embd, spec.vocab_size) == (6.0, 3, 128, 1000)
    assert "RWKV-6 L3 D128" in capsys.readouterr().out
    assert main(["make-model", str(tmp_path / "bad.bin")]) == 2
    assert main(["make-model", str(tmp_path / "bad.pth"), "--embd", "4"]) == 2


def test_interactive_console_streams_text(model_dir: Path, tmp_path: Path) -> None:
    """Without --jsonl the terminal chat prints replies and notices as text."""
    result = subprocess.run(
        [*CLI, "chat", "--model", str(model_dir / "v7.pth"), "--db", str(tmp_path / "db.sqlite3")],
        input="+reset\n+help\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=chat_env(),
    )
    assert "Chat reset." in result.stdout and "+gen TEXT" in result.stdout


def test_db_housekeeping_commands(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """db stats, export, backup and vacuum work on a real database, and say so clearly when wrong."""
    db = tmp_path / "house.sqlite3"
    run_chat(model_dir / "v7.pth", db, ["Hello there", "+gen Once", "+reset"], "--channel", "c9")
    capsys.readouterr()
    assert main(["db", "--db", str(db), "stats", "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["channels"] == 1 and numbers["turns"] == 3 and numbers["log_tokens"] > 0
    assert main(["db", "--db", str(db), "export", "--channel", "c9"]) == 0
    transcript = capsys.readouterr().out
    assert "[chat] Hello there" in transcript and "[+gen] Once" in transcript and "[+reset]" in transcript
    assert main(["db", "--db", str(db), "export", "--channel", "nobody"]) == 1
    copy = tmp_path / "backups" / "copy.sqlite3"
    assert main(["db", "--db", str(db), "backup", str(copy)]) == 0
    assert sqlite3.connect(copy).execute("SELECT count(*) FROM turns").fetchone()[0] == 3
    assert main(["db", "--db", str(db), "purge", "--channel", "c9"]) == 0
    assert main(["db", "--db", str(db), "purge", "--channel", "c9"]) == 1
    assert main(["db", "--db", str(db), "export", "--channel", "c9"]) == 1
    assert main(["db", "--db", str(db), "vacuum"]) == 0
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    capsys.readouterr()
    assert main(["db", "--db", str(tmp_path / "missing.sqlite3"), "stats"]) == EXIT_CONFIG
    assert "no database at" in capsys.readouterr().err


def test_bench_states_prints_and_writes_its_numbers(tmp_path: Path, model_dir: Path) -> None:
    """bench-states runs its three measurements on real files and writes them as JSON."""
    out = tmp_path / "states.json"
    argv = ["bench-states", "--size", "0.1B", "--intervals", "2", "--checkpoint-tokens", "1000"]
    argv += ["--model", str(model_dir / "v7.pth"), "--replay", "64", "--channels", "30"]
    argv += ["--scale-model", str(model_dir / "v7.pth"), "--restores", "30", "--json", str(out)]
    assert main(argv) == 0
    numbers = json.loads(out.read_text())
    writes = numbers["writes"]
    assert (
        writes["checkpoints_in_them"] == 2 and 2 * 1000 // 160 <= writes["turns_measured"] <= 2 * 1160 // 160
    )
    # Two whole checkpoints (each written to the WAL, then copied into the file) are in the count.
    assert writes["bytes_written_per_turn"] * writes["turns_measured"] > 2 * 2 * writes["state_bytes"]
    restore = numbers["restore"]
    assert restore["cold_load_ms"] > restore["hot_load_ms"] > 0 and restore["replay_tokens"] == 64
    scale = numbers["scale"]
    assert scale["tier_bytes"] <= scale["tier_budget_bytes"] and scale["restored_channels"] == 30
    assert (
        scale["checkpoint_bytes_after"] <= scale["database_budget_bytes"] < scale["checkpoint_bytes_before"]
    )
    assert scale["database_bytes_30_channels"] > scale["database_bytes_10_channels"]


def test_readme_configuration_table_lists_every_setting() -> None:
    """Every setting is documented in the README's table, and the table names no other."""
    from bot.settings import FIXES, Settings

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| (\w+) \| `RWKV_DISCORD_(\w+)` \|", readme, flags=re.MULTILINE))
    assert {(name, name.upper()) for name in Settings.model_fields} == documented
    assert set(FIXES) == set(Settings.model_fields)


def test_replicas_get_the_object_store_and_database_credentials_of_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`replicas start` hands the replicas the variables they need besides the settings (the
    object store's endpoint and keys, Postgres's password), and nothing else of its environment
    (the Discord token stays with the command)."""
    from bot.replicas import forwarded_environment

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://objects:8333")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("PGPASSWORD", "pg")
    monkeypatch.setenv("RWKV_DISCORD_TOKEN", "discord-token")
    forwarded = forwarded_environment()
    assert forwarded["AWS_ENDPOINT_URL"] == "http://objects:8333" and forwarded["PGPASSWORD"] == "pg"
    assert forwarded["AWS_SECRET_ACCESS_KEY"] == "secret"
    assert "RWKV_DISCORD_TOKEN" not in forwarded and "PATH" not in forwarded


def test_each_shard_process_has_a_heartbeat_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two processes of one sharded bot beside one database beat in files of their own: `health`
    of the process whose heartbeat stopped says so while the other's is fresh."""
    for name in [n for n in os.environ if n.startswith("RWKV_DISCORD_")]:
        monkeypatch.delenv(name)
    db = tmp_path / "bot.sqlite3"
    first = load_settings(db=db, shard_ids="0-1", shard_count=4)
    second = load_settings(db=db, shard_ids="2-3", shard_count=4)
    paths = {heartbeat_path(first), heartbeat_path(second), heartbeat_path(load_settings(db=db))}
    assert len(paths) == 3 and all(p.parent == tmp_path for p in paths)
    heartbeat_path(first).touch()
    assert main(["health", "--db", str(db), "--shards", "0-1", "--shard-count", "4"]) == 0
    assert main(["health", "--db", str(db), "--shards", "2-3", "--shard-count", "4"]) == 1
    assert "no heartbeat" in capsys.readouterr().err
