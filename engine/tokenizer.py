"""Tokenizers: the World vocabulary shipped in the ``rwkv`` package, or a user's ``tokenizer.json``.

RWKV-5/6/7 and RWKV-4 "World" models use the 65,536-entry World vocabulary; Pile and Raven RWKV-4
models use the GPT-NeoX "20B" ``tokenizer.json`` that the user supplies with the model.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Protocol

from engine.errors import TokenizerError
from engine.formats import ModelSpec
from engine.shapes import WORLD_VOCAB_SIZE

END_OF_TEXT = 0


class Tokenizer(Protocol):
    """What the chat needs of a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    newline_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of a text."""

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; bytes that do not form UTF-8 come out as U+FFFD."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt, in the form the models were trained on."""


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt (the text fed before generating)."""
    return tokenizer.encode_prompt(text)


class WorldTokenizer:
    """The ``rwkv_vocab_v20230424`` vocabulary shipped in the ``rwkv`` package.

    Encoding is the reference's greedy longest match over UTF-8 bytes. The package's own trie
    takes seconds to build (a 256-entry list per node); a dictionary of pieces with, per first
    byte, the piece lengths that exist gives the same tokens and loads in a fraction of that.
    """

    name = "world"
    vocab_size = WORLD_VOCAB_SIZE
    eos_id = END_OF_TEXT
    newline_id = 11

    def __init__(self) -> None:
        spec = importlib.util.find_spec("rwkv")
        if spec is None or not spec.submodule_search_locations:
            raise TokenizerError("the rwkv package is not installed: pip install rwkv")
        folder = Path(next(iter(spec.submodule_search_locations)))
        self._pieces: dict[int, bytes] = {}
        self._ids: dict[bytes, int] = {}
        lengths: dict[bytes, set[int]] = {}
        with open(folder / "rwkv_vocab_v20230424.txt", encoding="utf-8") as vocab:
            for line in vocab:
                first, last = line.index(" "), line.rindex(" ")
                # The package's own file of Python literals (the package reads it the same way).
                literal = eval(line[first:last])
                piece = literal.encode("utf-8") if isinstance(literal, str) else bytes(literal)
                if len(piece) != int(line[last:]):
                    raise TokenizerError(f"the World vocabulary is damaged at {line[:first]}")
                token = int(line[:first])
                self._pieces[token] = piece
                self._ids[piece] = token
                if len(piece) > 1:
                    lengths.setdefault(piece[:2], set()).add(len(piece))
        # Per two-byte start, the lengths of the pieces that begin with it, longest first.
        self._lengths = {start: sorted(found, reverse=True) for start, found in lengths.items()}

    def encode(self, text: str) -> list[int]:
        """Token ids of a text: at each position, the longest piece of the vocabulary."""
        data = text.encode("utf-8", errors="replace")
        ids, pieces, lengths = [], self._ids, self._lengths
        i, end = 0, len(data)
        while i < end:
            for size in lengths.get(data[i : i + 2], ()):
                if i + size <= end:
                    token = pieces.get(data[i : i + size])
                    if token is not None:
                        break
            else:
                size, token = 1, pieces.get(data[i : i + 1])  # every byte is a piece of its own
                if token is None:
                    raise TokenizerError(f"byte {data[i]} has no token")
            ids.append(token)
            i += size
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; ids without a piece (end-of-text) decode to nothing."""
        return b"".join(self._pieces.get(i, b"") for i in ids).decode("utf-8", errors="replace")

    def encode_prompt(self, text: str) -> list[int]:
        """The World tokenizer is used for prompts as it is."""
        return self.encode(text)


class JsonTokenizer:
    """A Hugging Face ``tokenizer.json`` file (the 20B tokenizer of Pile and Raven models)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for any bad file
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc}") from exc
        self.name = str(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        newline = self._tok.encode("\n").ids
        if len(newline) != 1:
            raise TokenizerError(f"tokenizer {path} has no single token for a newline")
        self.newline_id = newline[0]
        eos = self._tok.token_to_id("<|endoftext|>")
        self.eos_id = END_OF_TEXT if eos is None else int(eos)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text."""
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def encode_prompt(self, text: str) -> list[int]:
        """Encode a prompt, splitting a trailing one-token blank line into two newlines.

        The 20B tokenizer encodes "\\n\\n" as one token (535) at the end of a text, while the
        models saw two newline tokens (187 187) there in training; the reference does the same.
        """
        ids = self.encode(text)
        if ids and text.endswith("\n\n") and self.decode(ids[-1:]) == "\n\n":
            ids[-1:] = [self.newline_id, self.newline_id]
        return ids


@functools.cache
def world_tokenizer() -> WorldTokenizer:
    """The World tokenizer, built once per process."""
    return WorldTokenizer()


def load_tokenizer(setting: str, spec: ModelSpec) -> Tokenizer:
    """Pick the tokenizer for a model.

    ``setting`` is ``auto`` (World for a 65,536-entry vocabulary, else a ``tokenizer.json``
    beside the model file), ``world``, or the path of a ``tokenizer.json``.
    """
    tokenizer: Tokenizer
    if setting == "world" or (setting == "auto" and spec.vocab_size == WORLD_VOCAB_SIZE):
        tokenizer = world_tokenizer()
    elif setting == "auto":
        beside = spec.path.with_name("tokenizer.json")
        if not beside.exists():
            raise TokenizerError(
                f"{spec.path.name} has a vocabulary of {spec.vocab_size} tokens, so it is no World "
                "model: set RWKV_DISCORD_TOKENIZER (or --tokenizer) to its tokenizer.json "
                "(the 20B tokenizer for Pile/Raven models), or put that file beside the model"
            )
        tokenizer = JsonTokenizer(beside)
    else:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        tokenizer = JsonTokenizer(path)
    if tokenizer.vocab_size > spec.vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model only "
            f"{spec.vocab_size}: they do not belong together"
        )
    return tokenizer
