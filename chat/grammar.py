"""The RWKV chat grammar: settings flags and ``+`` commands of one message, as a pure function.

``-temp=X`` and ``-top_p=Y`` may stand anywhere in a message and are removed exactly as typed.
Commands stand at the start and are case-insensitive: ``+reset``, ``+gen``, ``+i``, ``+qq``,
``+qa``, ``+++``, ``++``, ``+``, ``+help``, ``+faq``. Anything else is chat.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from engine.sampling import TEMPERATURE_RANGE, TOP_P_RANGE


class Command(enum.Enum):
    """What a message asks for."""

    CHAT = "chat"
    RESET = "+reset"
    GEN = "+gen"
    INSTRUCT = "+i"
    QQ = "+qq"
    QA = "+qa"
    CONTINUE = "+++"
    RETRY_GEN = "++"
    RETRY_CHAT = "+"
    HELP = "+help"
    FAQ = "+faq"
    SETTINGS = "settings"  # the message held only settings: they become the channel's defaults


# Commands that take a text, and the ones that must stand alone.
_WITH_TEXT = {
    "gen": Command.GEN,
    "i": Command.INSTRUCT,
    "qq": Command.QQ,
    "qa": Command.QA,
    "faq": Command.FAQ,
}
_PLUSES = {"+": Command.RETRY_CHAT, "++": Command.RETRY_GEN, "+++": Command.CONTINUE}

# name as typed -> (setting field, allowed range)
FLAGS: dict[str, tuple[str, tuple[float, float]]] = {
    "temp": ("temperature", TEMPERATURE_RANGE),
    "top_p": ("top_p", TOP_P_RANGE),
}
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_FLAG_RE = re.compile(r"(?<!\S)-(temp|top_p)=(\S*)[ \t]*", re.IGNORECASE)
_COMMAND_RE = re.compile(r"^\+([A-Za-z_]\w*)(?=\s|$)")


@dataclass(frozen=True)
class Overrides:
    """Sampling values given in a message (None: not given)."""

    temperature: float | None = None
    top_p: float | None = None

    def is_empty(self) -> bool:
        """True when the message set nothing."""
        return self.temperature is None and self.top_p is None

    def items(self) -> dict[str, float]:
        """The values that were given, by setting name."""
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p)) if v is not None}


@dataclass(frozen=True)
class Parsed:
    """A well-formed message."""

    command: Command
    text: str = ""  # the command's argument, or the chat message, flags removed
    overrides: Overrides = Overrides()
    notices: tuple[str, ...] = ()  # e.g. a clamped value
    unknown: str | None = None  # an unknown +word, answered with the help text


@dataclass(frozen=True)
class GrammarError:
    """A message that cannot be acted on; ``message`` says why and how to fix it."""

    message: str


def clean_text(raw: str) -> str:
    """Make arbitrary input safe to tokenize: no NUL, no lone surrogates, LF line ends."""
    text = raw.encode("utf-8", errors="replace").decode("utf-8")
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    return text


def normalise_chat(text: str) -> str:
    """Chat text: a blank line ends a turn in the template, so runs of newlines become one,
    lines of only spaces included (a member could otherwise open a turn with "\\n \\n")."""
    return re.sub(r"\n(?:\s*\n)+", "\n", text.strip())


def _format(value: float) -> str:
    return f"{value:g}"


def parse_message(raw: str) -> Parsed | GrammarError:
    """Parse one message into a command, its text and its settings."""
    text = clean_text(raw).replace("\\n", "\n")
    values: dict[str, float] = {}
    notices: list[str] = []
    errors: list[str] = []
    for match in _FLAG_RE.finditer(text):
        typed, raw_value = match.group(1), match.group(2)
        name = typed.lower()
        field, (low, high) = FLAGS[name]
        try:
            if not _NUMBER_RE.match(raw_value):
                raise ValueError(raw_value)
            value = float(raw_value)
            if not math.isfinite(value):
                raise ValueError(raw_value)
        except ValueError:
            shown = raw_value or "nothing"
            errors.append(f"-{typed}= needs a number from {_format(low)} to {_format(high)}, not {shown}")
            continue
        if field in values:
            errors.append(f"-{typed}= is given twice; give it once")
            continue
        clamped = min(max(value, low), high)
        if clamped != value:
            notices.append(
                f"-{typed}={raw_value} is out of range, so {_format(clamped)} is used "
                f"(allowed: {_format(low)} to {_format(high)})."
            )
        values[field] = clamped
    if errors:
        return GrammarError("; ".join(errors) + ". Nothing was done.")
    text = _FLAG_RE.sub("", text).strip()
    overrides = Overrides(**values)

    if not text:
        if overrides.is_empty():
            return Parsed(Command.HELP)
        return Parsed(Command.SETTINGS, "", overrides, tuple(notices))

    if text in _PLUSES:
        return Parsed(_PLUSES[text], "", overrides, tuple(notices))

    command_match = _COMMAND_RE.match(text)
    if command_match is None:
        return Parsed(Command.CHAT, normalise_chat(text), overrides, tuple(notices))
    word = command_match.group(1).lower()
    rest = text[command_match.end() :].strip()
    if word in _WITH_TEXT:
        command = _WITH_TEXT[word]
        if not rest:
            return GrammarError(f"+{word} needs a text after it, for example: +{word} Hello")
        if command is Command.FAQ and not overrides.is_empty():
            notices.append("-temp= and -top_p= do nothing with +faq; they were ignored.")
            overrides = Overrides()
        if command in (Command.INSTRUCT, Command.QA):
            rest = normalise_chat(rest)
        return Parsed(command, rest, overrides, tuple(notices))
    if word == "reset" and rest:
        return GrammarError("+reset takes no text: send +reset on its own.")
    command = Command.RESET if word == "reset" else Command.HELP
    if not overrides.is_empty():
        notices.append(f"-temp= and -top_p= do nothing with +{word}; they were ignored.")
    return Parsed(
        command, "", Overrides(), tuple(notices), unknown=None if word in ("reset", "help") else f"+{word}"
    )


HELP_TEXT = """\
How to talk to me:
- Just write: your message continues this channel's conversation.
- -temp=X (0.2 to 5) and -top_p=Y (0 to 1) anywhere in a message apply to that message;
  a message with only settings makes them this channel's defaults. -top_p=0 is greedy.
- +reset: start this channel's conversation again.
- +gen TEXT: free generation that continues TEXT.
- +i TEXT: follow an instruction. +qq TEXT: a short question and answer.
- +qa TEXT: one question to the assistant, outside this channel's conversation.
- +++: continue the last free generation. ++: retry it with a new sample.
- +: retry my last chat reply.
- +faq WORDS: look up the RWKV FAQ. +help: this text.
In a message, the two characters \\n stand for a new line."""
