"""A channel's own settings: what may be set, in which range, and the context of one message.

The chat service publishes :class:`SettingLimits`, so a front end offers exactly the ranges the
service accepts (a slash command's bounds, a help text).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from chat.presets import Preset
from chat.states import StatePolicy
from engine.sampling import SAMPLING_RANGES

log = logging.getLogger(__name__)

# Sampling settings a moderator may change, with their allowed ranges.
SETTING_RANGES: dict[str, tuple[float, float]] = {
    name: SAMPLING_RANGES[name] for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")
}
THINKING_DISPLAYS = ("fold", "show", "hide")  # how a front end shows <think> sections
RESET_POLICIES = ("everyone", "moderators")  # who may use +reset in text, per server
# on/off settings: faq_auto (clear FAQ questions answered from the FAQ first), speaker_names
# (the speaker's name in each chat turn, when the front end gives one; on unless switched off)
SWITCHES = ("faq_auto", "speaker_names")
SYSTEM_PROMPT_MAX = 1500  # characters of a channel's system prompt (its persona)
# Who may talk to the bot, per server and per channel: role ids allowed, and denied.
ROLE_LISTS = {"allow": "roles_allowed", "deny": "roles_denied"}
ROLE_RULES = ("allow", "deny", "remove")


@dataclass(frozen=True)
class RoleRules:
    """The roles that may talk to the bot in a channel: a member with a denied role may not;
    when some roles are allowed, a member needs one of them. A channel's allowed roles replace
    its server's; denied roles add up."""

    allowed: frozenset[str] = frozenset()
    denied: frozenset[str] = frozenset()

    @classmethod
    def combined(cls, server: dict[str, Any], channel: dict[str, Any]) -> RoleRules:
        """The rules of a channel from its server's settings and its own."""

        def roles(settings: dict[str, Any], rule: str) -> frozenset[str]:
            value = settings.get(ROLE_LISTS[rule], [])
            return (
                frozenset(r for r in value if isinstance(r, str)) if isinstance(value, list) else frozenset()
            )

        allowed = roles(channel, "allow") or roles(server, "allow")
        return cls(allowed, roles(server, "deny") | roles(channel, "deny"))

    def permits(self, member_roles: set[str]) -> bool:
        """Whether a member with these role ids may talk to the bot."""
        return not member_roles & self.denied and (not self.allowed or bool(member_roles & self.allowed))


@dataclass(frozen=True)
class ChatConfig:
    """Limits and defaults of the chat, from the settings."""

    default_preset: str
    max_input_tokens: int = 2048
    gen_max_tokens: int = 256  # +gen/+i/+qq/+qa length (then up to 100 more to end cleanly)
    chat_max_tokens: int = 999  # hard cap of a chat reply
    seed: int | None = None
    states: StatePolicy = field(default_factory=StatePolicy)
    # the lease holder name of this service when several share one store (cluster replicas);
    # None: the only service of its store
    owner: str | None = None


@dataclass(frozen=True)
class SettingLimits:
    """What a channel setting may be: the sampling ranges and the longest reply."""

    ranges: dict[str, tuple[float, float]]
    max_tokens: int
    thinking: tuple[str, ...] = THINKING_DISPLAYS

    def check(self, name: str, value: object) -> bool:
        """True when ``value`` is allowed for the setting ``name`` (a preset name is checked by
        the caller, who knows the presets)."""
        number = None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)
        if name in self.ranges:
            low, high = self.ranges[name]
            return number is not None and low <= number <= high
        if name == "max_tokens":
            return number is not None and number.is_integer() and 1 <= number <= self.max_tokens
        if name == "thinking":
            return value in self.thinking
        if name in SWITCHES:
            return isinstance(value, bool)
        if name == "system_prompt":
            return isinstance(value, str) and 0 < len(value) <= SYSTEM_PROMPT_MAX
        if name in ROLE_LISTS.values():
            return isinstance(value, list) and all(isinstance(r, str) and r.isdigit() for r in value)
        return False


@dataclass(frozen=True)
class ChannelContext:
    """What one message of a channel works with, read once: its checked settings and preset."""

    channel_id: str
    settings: dict[str, Any]
    preset: Preset
    speaker: str | None = None  # who wrote the message, when the front end knows (a display name)

    @property
    def thinking(self) -> str:
        """How this channel shows ``<think>`` sections: fold, show or hide."""
        return str(self.settings.get("thinking", "fold"))

    @property
    def faq_auto(self) -> bool:
        """Whether clear FAQ questions are answered from the FAQ before the model."""
        return bool(self.settings.get("faq_auto", False))

    @property
    def named_speaker(self) -> str | None:
        """The speaker to name in the chat turn: None without one, or when the channel switched
        names off (the terminal gives none, so it keeps the reference's format)."""
        return self.speaker if self.settings.get("speaker_names", True) else None

    def sampling_overrides(self) -> dict[str, float]:
        """The channel's own sampling values (over the preset's)."""
        return {k: float(v) for k, v in self.settings.items() if k in SAMPLING_RANGES}


def checked_settings(
    stored: dict[str, Any], limits: SettingLimits, presets: dict[str, Preset], channel_id: str
) -> dict[str, Any]:
    """The stored settings that are valid; a value stored wrong (by hand, or by an older version)
    is logged and left out, so the default applies and the channel keeps working."""
    valid: dict[str, Any] = {}
    for name, value in stored.items():
        ok = isinstance(value, str) and value in presets if name == "preset" else limits.check(name, value)
        if ok:
            valid[name] = value
        else:
            log.warning(
                "channel %s: stored setting %s=%.40r is not valid: using the default", channel_id, name, value
            )
    return valid
