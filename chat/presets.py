"""Prompt presets: data files (TOML) that give the chat its roles and opening prompt.

No code is ever executed from a preset (the reference's ``+prompt PATH`` ran a Python file).
The bundled presets live beside this module; an operator's folder adds or overrides them by name.
A preset there may name an RWKV-PEFT state-tuning file beside it (``state = "persona.pth"``) as its
opening state (see :mod:`chat.tuned_states`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import re
import tomllib
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chat.errors import PresetError
from chat.grammar import normalise_chat
from engine.sampling import SAMPLING_RANGES, SamplingParams

__all__ = [
    "Preset",
    "PresetError",
    "clean_speaker",
    "default_preset_name",
    "load_presets",
    "parse_preset",
    "speaker_tag",
]

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class Preset:
    """Roles, separator, opening prompt and default sampling of a chat."""

    name: str
    description: str
    user: str
    bot: str
    separator: str
    init_prompt: str  # normalised: "\n" + lines + "\n\n"
    sampling: SamplingParams
    thinking: bool = False  # the model may write <think>...</think> sections
    state_file: Path | None = None  # an RWKV-PEFT state-tuning file: the opening state
    state_digest: str = ""  # sha256 of that file, so a new version gets a new opening

    @property
    def key(self) -> str:
        """Identity of the content: a changed preset gets a new initial snapshot."""
        text = "\x1f".join([self.user, self.bot, self.separator, self.init_prompt, self.state_digest])
        return f"{self.name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def with_system(self, prompt: str) -> Preset:
        """This preset with a channel's system prompt (a persona): the G1 template's
        ``System:`` turn before the opening prompt. Its key differs, so its opening state is
        its own, computed once and shared by every channel with the same prompt."""
        system = normalise_init_prompt(f"System{self.separator} {normalise_chat(prompt)}").strip("\n")
        return replace(self, init_prompt=normalise_init_prompt(f"{system}\n\n{self.init_prompt.strip()}"))

    def chat_turn(self, message: str, speaker: str | None = None) -> str:
        """The text fed for one user message: ``{user}{sep} MESSAGE\\n\\n{bot}{sep}``; with a
        speaker, ``{user}{sep} [NAME] MESSAGE...`` (see :func:`speaker_tag`)."""
        if speaker is not None:
            message = f"{speaker_tag(speaker, self)} {message}"
        return f"{self.user}{self.separator} {message}\n\n{self.bot}{self.separator}"


# Who is talking, in a shared channel. The speaker's name goes inside the user's turn as
# ``User: [alice] message``, not as the role (``alice: message``): G1 and World models were
# trained on the ``User:``/``Assistant:`` roles, and an unknown role name makes them drift into
# writing further turns themselves; a bracketed tag at the start of the turn reads as part of
# what the user said, and the model picks the name up to address people. The name is sanitised
# so that it can neither end the turn (newlines, a blank line) nor open one (``Xxx:``), close
# its brackets, open a ``<think>`` section, or claim a role of the template (Assistant, System,
# User, or the preset's own role names).
SPEAKER_MAX = 32
_UNSAFE_SPEAKER = re.compile(r"[\[\]<>:\\`|]+")
_ROLE_WORDS = ("assistant", "system", "user", "bot", "think")
UNNAMED_SPEAKER = "member"


def speaker_tag(name: str, preset: Preset | None = None) -> str:
    """The speaker's name as it stands in a turn: ``[name]``, sanitised (see above)."""
    return f"[{clean_speaker(name, preset)}]"


def clean_speaker(name: str, preset: Preset | None = None) -> str:
    """A display name made safe to stand in a prompt: one line of letters, digits, spaces and
    harmless punctuation, at most :data:`SPEAKER_MAX` characters, never a role of the chat
    template (such a name becomes ``member``, as does one with nothing left)."""
    kept = "".join(
        " " if unicodedata.category(c)[0] in "CZ" else c  # controls, line breaks, odd spaces
        for c in unicodedata.normalize("NFKC", name)
    )
    kept = _UNSAFE_SPEAKER.sub(" ", kept)
    kept = " ".join(kept.split())[:SPEAKER_MAX].strip()
    roles = set(_ROLE_WORDS)
    if preset is not None:
        roles |= {preset.user.lower(), preset.bot.lower()}
    if not kept or roles & set(re.findall(r"\w+", kept.casefold())):
        return UNNAMED_SPEAKER
    return kept


def normalise_init_prompt(text: str) -> str:
    """Strip every line, then ``"\\n" + joined.strip() + "\\n\\n"``, as the reference does."""
    lines = [line.strip().strip("\u3000").strip("\r") for line in text.strip().split("\n")]
    return "\n" + "\n".join(lines).strip() + "\n\n"


_PRESET_KEYS = {"description", "user", "bot", "separator", "init_prompt", "thinking", "sampling", "state"}


def _text(name: str, data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if value is None:
        raise PresetError(f"preset {name!r} has no {key!r}")
    if not isinstance(value, str):
        raise PresetError(f"preset {name!r}: {key} must be text in quotes, not {value!r}")
    return value


def _sampling(name: str, raw: object) -> SamplingParams:
    """The [sampling] table, each value a finite number inside the range a setting may take."""
    if not isinstance(raw, dict):
        raise PresetError(f"preset {name!r}: [sampling] must be a table")
    unknown = sorted(set(raw) - set(SAMPLING_RANGES))
    if unknown:
        raise PresetError(
            f"preset {name!r}: unknown [sampling] key {unknown[0]!r}; known: {', '.join(SAMPLING_RANGES)}"
        )
    values: dict[str, float] = {}
    for key, value in raw.items():
        low, high = SAMPLING_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise PresetError(f"preset {name!r}: [sampling] {key} must be a number, not {value!r}")
        if not low <= value <= high:
            raise PresetError(
                f"preset {name!r}: [sampling] {key} must be between {low:g} and {high:g}, not {value:g}"
            )
        values[key] = float(value)
    default = SamplingParams()
    return SamplingParams(
        temperature=values.get("temperature", default.temperature),
        top_p=values.get("top_p", default.top_p),
        presence_penalty=values.get("presence_penalty", default.presence_penalty),
        frequency_penalty=values.get("frequency_penalty", default.frequency_penalty),
        penalty_decay=values.get("penalty_decay", default.penalty_decay),
    )


def _state_file(name: str, data: dict[str, Any], folder: Path | None) -> tuple[Path | None, str]:
    """The preset's state-tuning file (``state = "file.pth"``, beside the preset) and its digest."""
    if "state" not in data:
        return None, ""
    value = data["state"]
    if not isinstance(value, str) or not value.endswith(".pth"):
        raise PresetError(f"preset {name!r}: state must be the name of a .pth file in quotes, not {value!r}")
    if folder is None:
        raise PresetError(f"preset {name!r}: a state file needs a preset file in a folder")
    path = folder / value
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        raise PresetError(f"preset {name!r}: cannot read its state file {path}: {exc}") from exc
    return path, digest


def parse_preset(name: str, text: str, folder: Path | None = None) -> Preset:
    """Build a preset from the text of a TOML file; raises :class:`PresetError`.

    As strict as the settings: every value of its type (a boolean is ``true``/``false``, not a
    string), numbers finite and inside the ranges a moderator may set, no unknown keys (a typo
    would otherwise be ignored without a word).
    """
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"preset {name!r} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - _PRESET_KEYS)
    if unknown:
        raise PresetError(
            f"preset {name!r}: unknown key {unknown[0]!r}; known: {', '.join(sorted(_PRESET_KEYS))}"
        )
    user, bot = _text(name, data, "user"), _text(name, data, "bot")
    state_file, state_digest = _state_file(name, data, folder)
    # A state-tuned preset needs no opening prompt: the state is its opening.
    prompt = _text(name, data, "init_prompt", "" if state_file else None)
    separator = _text(name, data, "separator", ":")
    description = _text(name, data, "description", name)
    if not user.strip() or not bot.strip() or "\n" in user + bot:
        raise PresetError(f"preset {name!r}: user and bot must be non-empty single-line names")
    if "\n" in separator or len(separator) > 8:
        raise PresetError(f"preset {name!r}: separator must be a short single-line text such as ':'")
    thinking = data.get("thinking", False)
    if not isinstance(thinking, bool):
        raise PresetError(f"preset {name!r}: thinking must be true or false (no quotes), not {thinking!r}")
    return Preset(
        name=name,
        description=description,
        user=user,
        bot=bot,
        separator=separator,
        init_prompt=normalise_init_prompt(prompt),
        sampling=_sampling(name, data.get("sampling", {})),
        thinking=thinking,
        state_file=state_file,
        state_digest=state_digest,
    )


def load_presets(extra_dir: Path | None = None) -> dict[str, Preset]:
    """The bundled presets, plus (overriding by name) the ``*.toml`` files of ``extra_dir``."""
    presets: dict[str, Preset] = {}
    bundled = importlib.resources.files("chat") / "presets"
    for entry in sorted(bundled.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            name = entry.name.removesuffix(".toml")
            presets[name] = parse_preset(name, entry.read_text(encoding="utf-8"))
    if extra_dir is not None:
        if not extra_dir.is_dir():
            raise PresetError(f"presets folder not found: {extra_dir}")
        for path in sorted(extra_dir.glob("*.toml")):
            name = path.stem.lower()
            if not set(name) <= NAME_CHARS:
                raise PresetError(f"preset file {path}: use letters, digits, - and _ in its name")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise PresetError(f"cannot read preset file {path}: {exc}") from exc
            presets[name] = parse_preset(name, text, path.parent)
    return presets


def default_preset_name(setting: str, family: int, is_world: bool) -> str:
    """Resolve the ``auto`` preset: G1 chat for World/RWKV-5+ models, Raven chat for Pile ones."""
    if setting != "auto":
        return setting
    return "g1-chat" if (is_world or family >= 5) else "raven-chat"
