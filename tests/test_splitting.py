"""Splitting replies into Discord messages: a property test and a few fixed cases."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.splitting import FenceState, split_message, split_raw

pieces = st.sampled_from(
    ["word ", "a longer sentence. ", "\n", "\n\n", "```py\n", "```\n", "x" * 300, "é🙂 "]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(pieces, max_size=60).map("".join), st.sampled_from([100, 500, 2000]))
def test_split_properties(text: str, limit: int) -> None:
    """Every message fits, the raw pieces join to the original, and code fences balance."""
    raw = split_raw(text, limit)
    assert "".join(raw) == text
    for message in split_message(text, limit):
        assert len(message) <= limit
        assert not FenceState().after(message).inside, "a message must not end inside a code block"


def test_short_text_is_one_message() -> None:
    """Text under the limit is sent as it is."""
    assert split_message("hello\n\nworld") == ["hello\n\nworld"]


def test_prefers_paragraph_then_line_then_word_boundaries() -> None:
    """Cuts fall after a blank line when there is one, else after a newline, else a space."""
    text = "a" * 60 + "\n\n" + "b" * 60 + "\n" + "c" * 60
    assert split_raw(text, 100) == ["a" * 60 + "\n\n", "b" * 60 + "\n", "c" * 60]
    words = " ".join(["word"] * 40)
    assert all(p.endswith(" ") for p in split_raw(words, 100)[:-1])


def test_code_block_is_closed_and_reopened() -> None:
    """A cut inside a python block closes it and reopens it with the same language."""
    text = "Here:\n```python\n" + "\n".join(f"x = {i}" for i in range(60)) + "\n```\nDone."
    messages = split_message(text, 200)
    assert len(messages) > 2
    assert messages[0].startswith("Here:") and messages[0].endswith("\n```")
    assert messages[1].startswith("```python\n")
    assert messages[-1].rstrip().endswith("Done.")
