"""`rwkv-discord fetch-model`: the bundled catalogue, the listing, and the real download code
(huggingface_hub's metadata call and http_get) against a local server that answers the way the
Hugging Face hub does: HEAD/GET /{repo}/resolve/{revision}/{file} redirect to a CDN address with
X-Repo-Commit, X-Linked-Etag (the sha256 of an LFS file) and X-Linked-Size; the CDN serves the bytes
and honours Range requests."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bot import fetch_model
from bot.fetch_model import CATALOGUE, load_catalogue, main

REPO = "owner/tiny-rwkv"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILE = "tiny-rwkv7-ctx4096.pth"
CONTENT = hashlib.sha256(b"seed").digest() * 9000  # 288,000 bytes
SHA = hashlib.sha256(CONTENT).hexdigest()
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class HubFiles:
    """What the stand-in hub serves and what it was asked."""

    content: bytes = CONTENT
    advertised_sha: str = SHA  # the etag the resolve call announces
    served: bytes | None = None  # bytes the CDN really sends (default: content)
    drop_first_get_after: int | None = None  # close the first full GET after this many bytes
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range


def _handler(files: HubFiles) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test reads `files.requests` instead."""

        def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _resolve(self) -> None:
            parts = self.path.split("/")  # '', owner, name, 'resolve', revision, file
            repo, revision, name = "/".join(parts[1:3]), parts[4], "/".join(parts[5:])
            common = {"X-Repo-Commit": COMMIT}
            if repo != REPO:
                self._answer(401, {"X-Error-Code": "RepoNotFound"}, b"Repository not found")
            elif revision not in (COMMIT, "main"):
                self._answer(404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id")
            elif name != FILE:
                self._answer(404, {**common, "X-Error-Code": "EntryNotFound"}, b"Entry not found")
            else:
                # The real hub redirects LFS files to a CDN on another host; here "localhost"
                # is another origin than "127.0.0.1", so the client does not follow it either.
                port = self.server.server_address[1]
                self._answer(
                    302,
                    {
                        **common,
                        "Location": f"http://localhost:{port}/cdn/{files.advertised_sha}",
                        "ETag": '"d0c5e4f0a1b2c3d4e5f60718293a4b5c6d7e8f90"',  # the git pointer's id
                        "X-Linked-Etag": f'"{files.advertised_sha}"',
                        "X-Linked-Size": str(len(files.content)),
                    },
                )

        def _cdn(self) -> None:
            data = files.content if files.served is None else files.served
            wanted = self.headers.get("Range")
            files.requests.append((self.command, self.path, wanted))
            start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted else 0
            headers = {"Accept-Ranges": "bytes", "ETag": f'"{files.advertised_sha}"'}
            if wanted:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            self.send_response(206 if wanted else 200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if files.drop_first_get_after is not None and not wanted:
                cut, files.drop_first_get_after = files.drop_first_get_after, None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            if self.path.startswith("/cdn/"):
                self._cdn()
                return
            files.requests.append((self.command, self.path, self.headers.get("Range")))
            if re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/.+", self.path):
                self._resolve()
            else:  # e.g. the client's look-ups under /api/ that this command does not need
                self._answer(404, {"Content-Type": "application/json"}, b'{"error": "not found"}')

    return Hub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubFiles]:
    """A stand-in hub on a free port, with HF_ENDPOINT pointing at it."""
    files = HubFiles()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(files))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()


def write_catalogue(path: Path, **changes: object) -> Path:
    """A one-model catalogue for the stand-in hub; `changes` replace fields (None removes one)."""
    entry: dict[str, object] = {
        "name": "tiny",
        "params": "0.0003B",
        "release": "test 2026-12-01",
        "repo": REPO,
        "file": FILE,
        "revision": COMMIT,
        "size": len(CONTENT),
        "size_exact": True,
        "sha256": SHA,
        "context": 4096,
        "ram_fp32_gb": 0.1,
        "ram_bf16_gb": 0.1,
        "vram_fp16_gb": 0.1,
        "use": "tests",
        "source": "https://example.org/tiny",
    }
    entry.update(changes)

    def toml(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(value)

    lines = ['default_cpu = "tiny"', 'default_gpu = "tiny"', "", "[[models]]"]
    lines += [f"{key} = {toml(value)}" for key, value in entry.items() if value is not None]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """main() with the test catalogue and a models folder under tmp_path; (status, out, err)."""
    catalogue = tmp_path / "catalogue.toml"
    if not catalogue.exists():
        write_catalogue(catalogue)
    status = main([*args, "--dir", str(tmp_path / "models"), "--catalogue", str(catalogue)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """The lines of our own error messages (progress bars may share stderr)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("rwkv-discord fetch-model: error:")]


def model_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- the bundled catalogue and the listing ---------------------------------------------------------


def test_bundled_catalogue_parses_and_every_entry_is_complete() -> None:
    """Every bundled entry has all its fields, its file name agrees with its size and context,
    checked entries are pinned to a commit, and the defaults exist."""
    catalogue = load_catalogue()
    assert catalogue.default_cpu in catalogue.models and catalogue.default_gpu in catalogue.models
    sizes = []
    for model in catalogue.models.values():
        assert model.repo == "BlinkDL/rwkv7-g1", model.name
        assert f"ctx{model.context}" in model.file, model.name
        assert model.name.split("-")[-1] in model.file, model.name  # e.g. 1.5b
        assert model.ram_fp32_gb > model.ram_bf16_gb > model.size / 1e9, model.name
        assert model.vram_fp16_gb > model.size / 1e9, model.name
        if model.size_exact:
            assert model.sha256 is not None and len(model.revision) == 40, model.name
        sizes.append(model.size)
    assert min(sizes) < 0.5e9 and max(sizes) > 14e9  # 0.1B to 7B+
    assert sizes == sorted(sizes)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"size": None}, "field 'size'"),
        ({"sha256": "abc"}, "field 'sha256'"),
        ({"file": "model.safetensors"}, "field 'file'"),
        ({"ram_fp32_gb": "lots"}, "field 'ram_fp32_gb'"),
        ({"size_exact": "yes"}, "field 'size_exact'"),
        ({"colour": "blue"}, "unknown field(s) colour"),
    ],
)
def test_a_broken_catalogue_entry_is_refused_with_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, object], named: str
) -> None:
    """A broken entry stops the command with one line that names the entry and the field."""
    write_catalogue(tmp_path / "catalogue.toml", **change)
    status, out, err = run(tmp_path, capsys)
    assert status == 2 and out == ""
    (line,) = error_lines(err)
    assert "model 1 (tiny)" in line and named in line


def test_listing_shows_sizes_memory_and_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a name: one row per model with download size, memory per strategy, context, and
    the CPU and GPU defaults marked; then how to download one."""
    assert main([]) == 0
    out = capsys.readouterr().out
    catalogue = load_catalogue(CATALOGUE)
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split()[:1] in ([n] for n in catalogue.models)
    }
    assert rows.keys() == catalogue.models.keys()
    assert rows[catalogue.default_cpu].endswith("CPU default")
    assert rows[catalogue.default_gpu].endswith("GPU default")
    big = catalogue.models["g0-7.2b"]
    assert f"{big.ram_fp32_gb:.1f} GB" in rows["g0-7.2b"] and "14.40 GB" in rows["g0-7.2b"]
    assert "RAM fp32" in out and "VRAM fp16" in out
    assert f"on a CPU: {catalogue.default_cpu}; on a GPU: {catalogue.default_gpu}" in out


def test_unknown_name_lists_the_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown name is a usage error of one line that lists the names."""
    status, out, err = run(tmp_path, capsys, "g9-99b")
    assert status == 2 and out == ""
    (line,) = error_lines(err)
    assert "unknown model 'g9-99b'" in line and "choose one of tiny" in line


def test_the_module_does_not_import_torch_or_the_hub_client() -> None:
    """Listing must start fast: no torch, and huggingface_hub only when downloading."""
    code = (
        "import sys, bot.fetch_model as f; f.main([]); "
        "assert 'torch' not in sys.modules and 'huggingface_hub' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=60)


# -- downloads against the stand-in hub --------------------------------------------------------------


def test_download_writes_the_right_bytes_and_says_how_to_use_them(
    hub: HubFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file lands under --dir with the served bytes; the output gives the setting line."""
    status, out, err = run(tmp_path, capsys, "tiny")
    assert status == 0, err
    target = (tmp_path / "models" / FILE).resolve()
    assert target.read_bytes() == CONTENT
    assert model_files(tmp_path) == [FILE]  # no partial file left behind
    assert f"RWKV_DISCORD_MODEL={target}\n" in out
    assert "size and sha256 match the catalogue" in out
    assert ("HEAD", f"/{REPO}/resolve/{COMMIT}/{FILE}", None) in hub.requests
    assert ("GET", f"/cdn/{SHA}", None) in hub.requests


def test_a_partial_download_continues_with_a_range_request(
    hub: HubFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `.incomplete` file left by an interrupted run is continued from its end."""
    folder = tmp_path / "models"
    folder.mkdir()
    kept = 100_000
    (folder / f"{FILE}.{SHA[:16]}.incomplete").write_bytes(CONTENT[:kept])
    status, out, err = run(tmp_path, capsys, "tiny")
    assert status == 0, err
    assert "continuing" in out
    gets = [r for r in hub.requests if r[0] == "GET"]
    assert gets == [("GET", f"/cdn/{SHA}", f"bytes={kept}-")]
    assert (folder / FILE).read_bytes() == CONTENT
    assert model_files(tmp_path) == [FILE]


def test_a_dropped_connection_is_resumed_where_it_stopped(
    hub: HubFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server closes the first transfer after 15 MB: huggingface_hub writes what it holds in
    whole 10 MB chunks and asks for the rest by Range, in the same run."""
    big = CONTENT * 84  # 24.2 MB
    hub.content, hub.advertised_sha = big, hashlib.sha256(big).hexdigest()
    hub.drop_first_get_after = 15_000_000
    write_catalogue(tmp_path / "catalogue.toml", size=len(big), sha256=hub.advertised_sha)
    status, _, err = run(tmp_path, capsys, "tiny")
    assert status == 0, err
    ranges = [r[2] for r in hub.requests if r[0] == "GET"]
    assert ranges == [None, f"bytes={10 * 1024 * 1024}-"]
    assert (tmp_path / "models" / FILE).read_bytes() == big


def test_a_size_that_disagrees_with_the_catalogue_is_refused(
    hub: HubFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hub's size is not the catalogue's: nothing is downloaded, one line says why."""
    write_catalogue(tmp_path / "catalogue.toml", size=len(CONTENT) + 1)
    status, _, err = run(tmp_path, capsys, "tiny")
    assert status == 1
    (line,) = error_lines(err)
    assert "size mismatch" in line and str(len(CONTENT)) in line
    assert model_files(tmp_path) == []
    assert not [r for r in hub.requests if r[0] == "GET"]


def test_a_rounded_catalogue_size_is_accepted_within_one_percent(
    hub: HubFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entry whose size the hub shows rounded (size_exact = false) downloads; the hub's own
    sha256 (its LFS etag) is what the file is checked against when the catalogue has none."""
    write_catalogue(tmp_path / "catalogue.toml", size=288_500, size_exact=False, sha256=None)
    status, out, err = run(tmp_path, capsys, "tiny")
    assert status == 0, err
    assert "size and sha256 match the hub" in out
    assert (tmp_path / "models" / FILE).read_bytes() == CONTENT


def test_a_catalogue_hash_that_the_hub_contradicts_is_refused(
    hub: HubFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hub announces another sha256 than the catalogue's: nothing is downloaded."""
    hub.advertised_sha = "f" * 64
    status, _, err = run(tmp_path, capsys, "tiny")
    assert status == 1
    (line,) = error_lines(err)
    assert "sha256 mismatch" in line and "not downloading" in line
    assert model_files(tmp_path) == []


def test_bytes_that_do_not_match_the_hash_are_deleted(
    hub: HubFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CDN sends other bytes of the right length: the check fails, the file is deleted and
    the message says so; no model file is left."""
    hub.served = bytes(len(CONTENT))
    status, out, err = run(tmp_path, capsys, "tiny")
    assert status == 1
    (line,) = error_lines(err)
    assert "sha256 mismatch" in line and "deleted" in line
    assert model_files(tmp_path) == []
    assert "RWKV_DISCORD_MODEL" not in out


def test_an_unreachable_hub_is_one_line_with_the_manual_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens at HF_ENDPOINT: one line says the hub is unreachable and gives the
    address to download by hand."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    status, _, err = run(tmp_path, capsys, "tiny")
    assert status == 1
    (line,) = error_lines(err)
    assert "unreachable" in line
    assert f"https://huggingface.co/{REPO}/resolve/{COMMIT}/{FILE}" in line and SHA in line
    assert model_files(tmp_path) == []


def test_a_file_missing_on_the_hub_is_one_line(
    hub: HubFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The catalogue names a file the hub does not have."""
    write_catalogue(tmp_path / "catalogue.toml", file="gone-ctx4096.pth")
    status, _, err = run(tmp_path, capsys, "tiny")
    assert status == 1
    (line,) = error_lines(err)
    assert "the hub has no gone-ctx4096.pth" in line and "out of date" in line


def test_too_little_disk_space_is_refused_before_downloading(
    hub: HubFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Less free space than the rest of the file needs: one line, no download started.
    (The free space is the one value faked: a test cannot fill this machine's disk.)"""
    monkeypatch.setattr(fetch_model, "_free_bytes", lambda folder: 1000)
    status, _, err = run(tmp_path, capsys, "tiny")
    assert status == 1
    (line,) = error_lines(err)
    assert "not enough disk space" in line and "--dir" in line
    assert not [r for r in hub.requests if r[0] == "GET"]


def test_a_model_already_downloaded_is_checked_without_the_network(
    hub: HubFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run twice: the second run checks the file's sha256 against the catalogue and needs no hub;
    a damaged file at that name is refused, not silently used or overwritten."""
    assert run(tmp_path, capsys, "tiny")[0] == 0
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    status, out, _ = run(tmp_path, capsys, "tiny")
    assert status == 0 and "already here" in out
    target = tmp_path / "models" / FILE
    target.write_bytes(b"x" * len(CONTENT))
    status, _, err = run(tmp_path, capsys, "tiny")
    assert status == 1
    (line,) = error_lines(err)
    assert "exists but is not the catalogue's tiny" in line
    assert target.read_bytes() == b"x" * len(CONTENT)


# -- scripts/start without a model --------------------------------------------------------------------


def _start(tmp_path: Path, *args: str, env_file: str | None = None) -> subprocess.CompletedProcess[str]:
    """scripts/start from a copy of the repository's layout with no .venv, as a new owner has it."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "bot").mkdir()
    shutil.copy(ROOT / "scripts" / "start", tmp_path / "scripts" / "start")
    shutil.copy(CATALOGUE, tmp_path / "bot" / "models.toml")
    if env_file is not None:
        (tmp_path / ".env").write_text(env_file, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_DISCORD_")}
    return subprocess.run(
        ["bash", str(tmp_path / "scripts" / "start"), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_start_without_a_model_names_the_fetch_command(tmp_path: Path) -> None:
    """No RWKV_DISCORD_MODEL and no --model: the script says which command fetches the
    recommended model instead of failing later."""
    result = _start(tmp_path)
    catalogue = load_catalogue()
    assert result.returncode == 2
    assert f".venv/bin/rwkv-discord fetch-model {catalogue.default_cpu}" in result.stderr
    assert f"fetch-model {catalogue.default_gpu}" in result.stderr


@pytest.mark.parametrize(
    ("args", "env_file"),
    [(("--model", "m.pth"), None), (("--model=m.pth",), None), ((), "RWKV_DISCORD_MODEL=/models/m.pth\n")],
)
def test_start_with_a_model_goes_on(tmp_path: Path, args: tuple[str, ...], env_file: str | None) -> None:
    """A model given by --model or in .env passes the check (the copy has no .venv, so the
    start itself then fails, which is not this test's concern)."""
    result = _start(tmp_path, *args, env_file=env_file)
    assert "fetch-model" not in result.stderr
