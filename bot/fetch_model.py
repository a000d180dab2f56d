"""`rwkv-discord fetch-model [NAME]`: list the model catalogue, or download one model and check it.

The catalogue is a data file (``bot/models.toml``). A download asks the hub for the file's metadata
(size, sha256 for LFS files, the address of its bytes) with huggingface_hub, refuses a file that
disagrees with the catalogue, then streams the bytes with huggingface_hub's own ``http_get`` (its
progress bar, its Range requests) into ``FILE.<etag>.incomplete`` beside the target. The partial
file is kept when the download stops, so running the command again continues it. Only a file whose
size and sha256 match is renamed to its final name; a mismatching one is deleted.

huggingface_hub is imported only on the download path and torch never, so listing is instant.
Exit status: 0 done, 1 the download failed (network, disk, check), 2 a usage or catalogue error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

PROG = "rwkv-discord fetch-model"
CATALOGUE = Path(__file__).with_name("models.toml")
DEFAULT_DIR = Path("models")
# A size the hub shows rounded ("382 MB") is accepted within this fraction of the hub's exact size.
ROUNDED_SIZE_TOLERANCE = 0.01
HUB = "https://huggingface.co"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HASH_CHUNK = 8 * 1024 * 1024


class FetchError(Exception):
    """A download that failed for a reason the owner can act on; the message is one line."""


class CatalogueError(FetchError):
    """A catalogue file that is missing, unreadable or has a broken entry."""


class UsageError(FetchError):
    """A wrong command line, such as an unknown model name."""


@dataclass(frozen=True)
class CatalogueModel:
    """One downloadable model, as the catalogue describes it."""

    name: str
    params: str
    release: str
    repo: str
    file: str
    revision: str  # a commit id (the file never changes) or a branch such as main
    size: int  # bytes
    size_exact: bool  # False: the hub shows the size rounded, checked within 1%
    sha256: str | None  # None: only the hub's own sha256 (LFS etag) is checked
    context: int
    ram_fp32_gb: float
    ram_bf16_gb: float
    vram_fp16_gb: float
    use: str
    source: str


@dataclass(frozen=True)
class Catalogue:
    """Every model of a catalogue file, in file order, and the recommended defaults."""

    models: dict[str, CatalogueModel]
    default_cpu: str
    default_gpu: str


_TEXT_FIELDS = ("name", "params", "release", "repo", "file", "revision", "use", "source")
_NUMBER_FIELDS = ("ram_fp32_gb", "ram_bf16_gb", "vram_fp16_gb")


def _entry(raw: Mapping[str, Any], where: str) -> CatalogueModel:
    """One catalogue entry, checked field by field; a CatalogueError names the first bad one."""

    def bad(field: str, wanted: str) -> CatalogueError:
        return CatalogueError(f"{where}: field '{field}' {wanted}")

    for field in _TEXT_FIELDS:
        if not isinstance(raw.get(field), str) or not raw[field].strip():
            raise bad(field, "is missing or not a non-empty string")
    for field in ("size", "context"):
        value = raw.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(field, "is missing or not a positive whole number")
    for field in _NUMBER_FIELDS:
        value = raw.get(field)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 10_000:
            raise bad(field, "is missing or not a number of GB")
    if not isinstance(raw.get("size_exact"), bool):
        raise bad("size_exact", "is missing or not true/false")
    sha256 = raw.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.fullmatch(sha256)):
        raise bad("sha256", "is not 64 lowercase hex digits")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", raw["name"]):
        raise bad("name", "may hold only lowercase letters, digits, '.' and '-'")
    if raw["repo"].count("/") != 1:
        raise bad("repo", "is not of the form owner/name")
    if not raw["file"].endswith(".pth") or "/" in raw["file"]:
        raise bad("file", "is not a .pth file name")
    if not raw["source"].startswith("https://"):
        raise bad("source", "is not an https:// address")
    unknown = set(raw) - {*_TEXT_FIELDS, *_NUMBER_FIELDS, "size", "context", "size_exact", "sha256"}
    if unknown:
        raise CatalogueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return CatalogueModel(
        name=raw["name"],
        params=raw["params"],
        release=raw["release"],
        repo=raw["repo"],
        file=raw["file"],
        revision=raw["revision"],
        size=raw["size"],
        size_exact=raw["size_exact"],
        sha256=sha256,
        context=raw["context"],
        ram_fp32_gb=float(raw["ram_fp32_gb"]),
        ram_bf16_gb=float(raw["ram_bf16_gb"]),
        vram_fp16_gb=float(raw["vram_fp16_gb"]),
        use=raw["use"],
        source=raw["source"],
    )


def load_catalogue(path: Path = CATALOGUE) -> Catalogue:
    """Read and check a catalogue file; a CatalogueError says what is wrong in one line."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogueError(f"cannot read the catalogue {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"the catalogue {path} is not valid TOML: {exc}") from exc
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise CatalogueError(f"the catalogue {path} has no [[models]] entries")
    models: dict[str, CatalogueModel] = {}
    for number, raw in enumerate(entries, 1):
        label = raw.get("name") if isinstance(raw, dict) else None
        model = _entry(raw if isinstance(raw, dict) else {}, f"{path}, model {number} ({label or '?'})")
        if model.name in models:
            raise CatalogueError(f"{path}: the name '{model.name}' is used twice")
        models[model.name] = model
    defaults = []
    for key in ("default_cpu", "default_gpu"):
        value = data.get(key)
        if value not in models:
            raise CatalogueError(f"{path}: '{key}' must name one of the models, not {value!r}")
        defaults.append(str(value))
    return Catalogue(models, defaults[0], defaults[1])


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB"


def format_listing(catalogue: Catalogue) -> str:
    """The table `fetch-model` prints without a name: sizes, memory, and which to pick."""
    header = ("name", "params", "download", "RAM fp32", "RAM bf16", "VRAM fp16", "context", "")
    rows = [header]
    for model in catalogue.models.values():
        marks = [
            label
            for label, default in (
                ("CPU default", catalogue.default_cpu),
                ("GPU default", catalogue.default_gpu),
            )
            if model.name == default
        ]
        rows.append(
            (
                model.name,
                model.params,
                ("" if model.size_exact else "~") + _gb(model.size),
                f"{model.ram_fp32_gb:.1f} GB",
                f"{model.ram_bf16_gb:.1f} GB",
                f"{model.vram_fp16_gb:.1f} GB",
                str(model.context),
                ", ".join(marks),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append("")
    for model in catalogue.models.values():
        lines.append(f"{model.name}: {model.release}, for {model.use}")
    cpu, gpu = catalogue.default_cpu, catalogue.default_gpu
    lines += [
        "",
        "RAM fp32 / RAM bf16: peak memory with RWKV_DISCORD_STRATEGY='cpu fp32' / 'cpu bf16' "
        "(measured for 0.1B and 1.5B, the others by the same rule);",
        "VRAM fp16: GPU memory with 'cuda fp16' (an estimate). Details: bot/models.toml.",
        f"Download one with: rwkv-discord fetch-model NAME  (on a CPU: {cpu}; on a GPU: {gpu})",
    ]
    return "\n".join(lines)


def _manual_hint(model: CatalogueModel) -> str:
    """How to get the file without this command."""
    url = f"{HUB}/{model.repo}/resolve/{model.revision}/{model.file}"
    check = f" (sha256 {model.sha256})" if model.sha256 else ""
    return f"or download {url} by hand{check} and give its path with --model"


def _sha256_of(path: Path, out: TextIO) -> str:
    """The sha256 of a file (a few seconds a GB)."""
    print(f"checking the sha256 ({_gb(path.stat().st_size)})", file=out, flush=True)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _check_size(model: CatalogueModel, hub_size: int) -> None:
    """Refuse a hub file whose size disagrees with the catalogue (another file under that name)."""
    if model.size_exact:
        agrees = hub_size == model.size
    else:
        agrees = abs(hub_size - model.size) <= model.size * ROUNDED_SIZE_TOLERANCE
    if not agrees:
        raise FetchError(
            f"size mismatch: the hub's {model.file} is {hub_size} bytes, the catalogue says "
            f"{'' if model.size_exact else 'about '}{model.size}; not downloading it (the catalogue may "
            "be out of date)"
        )


def _metadata(model: CatalogueModel, endpoint: str) -> tuple[str, int, str]:
    """Ask the hub about the file (HEAD on its resolve address): where its bytes are, its size
    and its etag (the sha256 for an LFS file)."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        FileMetadataError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = hf_hub_url(model.repo, model.file, revision=model.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, library_name="rwkv-discord", endpoint=endpoint)
    except OfflineModeIsEnabled as exc:
        raise FetchError(
            f"HF_HUB_OFFLINE is set, so the hub is not asked: unset it, {_manual_hint(model)}"
        ) from exc
    except (RemoteEntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError) as exc:
        raise FetchError(
            f"the hub has no {model.file} in {model.repo} at {model.revision} (the catalogue may be "
            f"out of date): {_manual_hint(model)} after checking {HUB}/{model.repo}"
        ) from exc
    except HfHubHTTPError as exc:
        raise FetchError(
            f"the hub answered HTTP {exc.response.status_code} for {url}; try again later, "
            f"{_manual_hint(model)}"
        ) from exc
    except FileMetadataError as exc:
        raise FetchError(
            f"{endpoint} does not answer like a Hugging Face hub (check HF_ENDPOINT): {_manual_hint(model)}"
        ) from exc
    except (httpx2.TransportError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FetchError(
            f"the Hugging Face hub is unreachable at {endpoint} ({reason}): check the network or proxy "
            f"(HTTPS_PROXY), {_manual_hint(model)}"
        ) from exc
    if meta.size is None or meta.etag is None or meta.location is None:
        raise FetchError(
            f"{endpoint} gave no size or etag for {url}: is HF_ENDPOINT a Hugging Face hub? "
            f"{_manual_hint(model)}"
        )
    return meta.location, meta.size, meta.etag


def fetch(
    model: CatalogueModel,
    folder: Path,
    *,
    endpoint: str | None = None,
    out: TextIO | None = None,
) -> Path:
    """Download one catalogue model into `folder` (resuming a partial download), check its size
    and sha256, and return its path. Raises FetchError with a one-line reason."""
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HUB).rstrip("/")
    out = out or sys.stdout  # looked up now, so a redirected stdout is honoured
    target = folder / model.file
    if target.exists():
        return _check_existing(model, target, endpoint, out)

    location, size, etag = _metadata(model, endpoint)
    _check_size(model, size)
    hub_sha = etag if _SHA256.fullmatch(etag) else None  # LFS files: the etag is the sha256
    if model.sha256 and hub_sha and hub_sha != model.sha256:
        raise FetchError(
            f"sha256 mismatch: the hub's {model.file} has sha256 {hub_sha}, the catalogue says "
            f"{model.sha256}; not downloading it (the catalogue may be out of date)"
        )
    expected_sha = model.sha256 or hub_sha

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the folder {folder}: {exc.strerror or exc}") from exc
    partial = folder / f"{model.file}.{re.sub('[^0-9A-Za-z]', '', etag)[:16]}.incomplete"
    for stale in folder.glob(f"{_glob_escape(model.file)}.*.incomplete"):
        if stale != partial:  # a partial download of another version of the file
            stale.unlink(missing_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:
        partial.unlink()
        have = 0
    free = _free_bytes(folder)
    if size - have > free:
        raise FetchError(
            f"not enough disk space in {folder}: {model.file} needs {_gb(size - have)} more, "
            f"{_gb(free)} is free; free some space or choose another folder with --dir"
        )
    if have:
        print(f"continuing {model.file}: {_gb(have)} of {_gb(size)} already downloaded", file=out)
    else:
        print(f"downloading {model.file} ({_gb(size)}) from {model.repo}", file=out)
    _download(location, partial, have, size, model.file)

    got = partial.stat().st_size
    if got != size:
        partial.unlink()
        raise FetchError(
            f"size mismatch: received {got} bytes of {model.file}, the hub said {size}; "
            "the bad download was deleted, run the command again"
        )
    if expected_sha is None:
        print(f"the hub publishes no sha256 for {model.file}: only its size was checked", file=out)
    else:
        actual = _sha256_of(partial, out)
        if actual != expected_sha:
            partial.unlink()
            raise FetchError(
                f"sha256 mismatch: the downloaded {model.file} has sha256 {actual}, expected "
                f"{expected_sha}; the bad download was deleted, run the command again"
            )
        print(f"size and sha256 match the {'catalogue' if model.sha256 else 'hub'}", file=out)
    os.replace(partial, target)
    return target


def _glob_escape(name: str) -> str:
    """A file name as a glob pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _download(location: str, partial: Path, have: int, size: int, name: str) -> None:
    """Stream the bytes from `have` on into the partial file with huggingface_hub's http_get
    (its progress bar; a Range request when `have` > 0; its own retries on a broken connection)."""
    if have >= size:
        return
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    try:
        with partial.open("r+b" if have else "wb") as handle:
            handle.seek(have)
            # No token goes with the request: the bytes are public, usually on another host (a CDN).
            http_get(
                location, handle, resume_size=have, headers={}, expected_size=size, displayed_filename=name
            )
    except HfHubHTTPError as exc:
        raise FetchError(
            f"the download of {name} failed with HTTP {exc.response.status_code}; what arrived is kept, "
            "run the same command again to continue"
        ) from exc
    except OSError as exc:
        kept = _gb(partial.stat().st_size) if partial.exists() else "nothing"
        if exc.errno == errno.ENOSPC:
            raise FetchError(
                f"the disk is full: {kept} of {name} is kept in {partial}; free some space and run "
                "the same command again to continue"
            ) from exc
        if exc.errno is not None:
            raise FetchError(f"cannot write {partial}: {exc.strerror or exc}") from exc
        raise FetchError(
            f"the download of {name} stopped ({str(exc).splitlines()[0]}); {kept} is kept, "
            "run the same command again to continue"
        ) from exc
    except httpx2.TransportError as exc:
        kept = _gb(partial.stat().st_size) if partial.exists() else "nothing"
        raise FetchError(
            f"the connection to the hub broke ({type(exc).__name__}); {kept} of {name} is kept, "
            "run the same command again to continue"
        ) from exc


def _check_existing(model: CatalogueModel, target: Path, endpoint: str, out: TextIO) -> Path:
    """A model file already at the target: check it instead of downloading it again."""
    size = target.stat().st_size
    if model.sha256 is None:
        _, hub_size, etag = _metadata(model, endpoint)
        expected_sha = etag if _SHA256.fullmatch(etag) else None
        expected_size = hub_size
    else:
        expected_sha, expected_size = model.sha256, (model.size if model.size_exact else size)
    if size != expected_size or (expected_sha is not None and _sha256_of(target, out) != expected_sha):
        raise FetchError(
            f"{target} exists but is not the catalogue's {model.name} (size or sha256 differ): "
            "move or delete it, then run the command again"
        )
    checked = "size and sha256 match" if expected_sha else "size matches (the hub publishes no sha256)"
    print(f"{target} is already here; its {checked}", file=out)
    return target


def _print_listing(catalogue: Catalogue) -> int:
    """Print the listing; a reader that stops early (``| head``) is no error."""
    try:
        print(format_listing(catalogue), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Without NAME: list the RWKV-7 models this command can download, with the memory "
        "each needs and which to pick for a CPU or a GPU. With NAME: download that model from Hugging "
        "Face into --dir, with a progress bar; an interrupted download continues when the command is "
        "run again; the file is checked against its size and sha256. Set HF_ENDPOINT to use a mirror.",
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="a model name from the list, e.g. g1-1.5b")
    parser.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="folder for the model file (default: models/ in the current folder)",
    )
    parser.add_argument(
        "--catalogue", type=Path, default=CATALOGUE, metavar="FILE", help="another catalogue file (TOML)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fetch-model`` with `argv` (default: sys.argv[1:]) and return its exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        catalogue = load_catalogue(args.catalogue)
        if args.name is None:
            return _print_listing(catalogue)
        model = catalogue.models.get(args.name)
        if model is None:
            raise UsageError(
                f"unknown model '{args.name}': choose one of {', '.join(catalogue.models)} "
                "(fetch-model without a name lists them)"
            )
        path = fetch(model, args.dir).resolve()
    except (UsageError, CatalogueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except FetchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\n{PROG}: interrupted; the partial download is kept in {args.dir}, run the same command "
            "again to continue",
            file=sys.stderr,
        )
        return 130
    print(f"{model.name} ({model.release}, {_gb(path.stat().st_size)}) is at {path}")
    print("Use it with this line in .env (or pass --model with that path to run or chat):")
    print(f"RWKV_DISCORD_MODEL={path}")
    print("On a GPU, add RWKV_DISCORD_STRATEGY=cuda fp16 (the default is cpu fp32).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
