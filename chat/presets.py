"""Prompt presets: data files (TOML) that give the chat its roles and opening prompt.

No code is ever executed from a preset (the reference's ``+prompt PATH`` ran a Python file).
The bundled presets live beside this module; an operator's folder adds or overrides them by name.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.sampling import SamplingParams

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


class PresetError(ValueError):
    """A preset file that cannot be used."""


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

    @property
    def key(self) -> str:
        """Identity of the content: a changed preset gets a new initial snapshot."""
        text = "\x1f".join([self.user, self.bot, self.separator, self.init_prompt])
        return f"{self.name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def chat_turn(self, message: str) -> str:
        """The text fed for one user message: ``{user}{sep} MESSAGE\\n\\n{bot}{sep}``."""
        return f"{self.user}{self.separator} {message}\n\n{self.bot}{self.separator}"


def normalise_init_prompt(text: str) -> str:
    """Strip every line, then ``"\\n" + joined.strip() + "\\n\\n"``, as the reference does."""
    lines = [line.strip().strip("\u3000").strip("\r") for line in text.strip().split("\n")]
    return "\n" + "\n".join(lines).strip() + "\n\n"


def parse_preset(name: str, text: str) -> Preset:
    """Build a preset from the text of a TOML file; raises :class:`PresetError`."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"preset {name!r} is not valid TOML: {exc}") from exc
    try:
        user, bot, prompt = str(data["user"]), str(data["bot"]), str(data["init_prompt"])
    except KeyError as exc:
        raise PresetError(f"preset {name!r} has no {exc.args[0]!r}") from exc
    if not user.strip() or not bot.strip() or "\n" in user + bot:
        raise PresetError(f"preset {name!r}: user and bot must be non-empty single-line names")
    raw = data.get("sampling", {})
    if not isinstance(raw, dict):
        raise PresetError(f"preset {name!r}: [sampling] must be a table")
    defaults = SamplingParams()
    try:
        sampling = SamplingParams(
            temperature=float(raw.get("temperature", defaults.temperature)),
            top_p=float(raw.get("top_p", defaults.top_p)),
            presence_penalty=float(raw.get("presence_penalty", defaults.presence_penalty)),
            frequency_penalty=float(raw.get("frequency_penalty", defaults.frequency_penalty)),
            penalty_decay=float(raw.get("penalty_decay", defaults.penalty_decay)),
        )
    except (TypeError, ValueError) as exc:
        raise PresetError(f"preset {name!r}: [sampling] values must be numbers") from exc
    return Preset(
        name=name,
        description=str(data.get("description", name)),
        user=user,
        bot=bot,
        separator=str(data.get("separator", ":")),
        init_prompt=normalise_init_prompt(prompt),
        sampling=sampling,
        thinking=bool(data.get("thinking", False)),
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
            presets[name] = parse_preset(name, text)
    return presets


def default_preset_name(setting: str, family: int, is_world: bool) -> str:
    """Resolve the ``auto`` preset: G1 chat for World/RWKV-5+ models, Raven chat for Pile ones."""
    if setting != "auto":
        return setting
    return "g1-chat" if (is_world or family >= 5) else "raven-chat"
