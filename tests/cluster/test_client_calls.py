"""What the front end's client does when a replica dies or the tier is full: which calls go to
the next replica and which are never sent twice, in one line each. The deployment handle is
stood in for (Ray's own errors are raised), since these are the client's rules; the replicas
themselves die for real in ``test_replicas.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from ray.exceptions import ActorDiedError  # noqa: E402  (needs ray)
from ray.serve.exceptions import BackPressureError  # noqa: E402

from chat.errors import StoreError  # noqa: E402
from chat.outcome import Outcome, OutcomeKind  # noqa: E402
from cluster import client as client_module  # noqa: E402
from cluster.client import BUSY, LOST, RemoteChat  # noqa: E402


class _Stream:
    def __init__(self, failure: BaseException | None, events: list[Any]) -> None:
        self.failure, self.events = failure, events

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    async def _events(self) -> AsyncIterator[Any]:
        for event in self.events:
            yield event
        if self.failure is not None:
            raise self.failure

    def cancel(self) -> None:
        pass


class _Handle:
    """Answers each call with the next of ``failures`` raised (None: answered)."""

    def __init__(self, failures: list[BaseException | None], events: list[Any] | None = None) -> None:
        self.failures = failures
        self.events = events or []
        self.calls: list[str] = []
        self._method = ""
        self._stream = False

    def options(self, *, method_name: str, session_id: str, stream: bool = False) -> _Handle:
        self._method, self._stream = method_name, stream
        return self

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(self._method)
        failure = self.failures.pop(0) if self.failures else None
        if self._stream:
            return _Stream(failure, [] if failure is not None else list(self.events))

        async def answer() -> Any:
            if failure is not None:
                raise failure
            return True

        return answer()


def _remote(handle: _Handle) -> RemoteChat:
    return RemoteChat(handle, {"presets": {}, "limits": None, "model": "m"})


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RETRY_AFTER", 0.0)


async def test_a_read_goes_to_the_next_replica_when_its_replica_died() -> None:
    handle = _Handle([ActorDiedError(), None])
    assert await _remote(handle).busy("c") is True  # a read: asked again
    assert handle.calls == ["busy", "busy"]


@pytest.mark.parametrize("method", ["reset", "undo_reset"])
async def test_a_change_that_may_be_done_is_never_sent_twice(method: str) -> None:
    """A reset whose replica died may be done already: a second one would make undo bring back
    the empty conversation. It is said in one line instead."""
    handle = _Handle([ActorDiedError()])
    with pytest.raises(StoreError) as caught:
        await getattr(_remote(handle), method)("c")
    assert handle.calls == [method]
    assert caught.value.problem == "unreachable" and "may or may not be done" in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_a_tier_gone_for_good_is_one_line_not_a_traceback() -> None:
    handle = _Handle([ActorDiedError()] * 10)
    with pytest.raises(StoreError) as caught:
        await _remote(handle).context("c")
    assert caught.value.problem == "unreachable" and "\n" not in str(caught.value)
    assert len(handle.calls) == client_module.RETRIES + 1


async def test_a_full_tier_is_said_at_once() -> None:
    handle = _Handle([BackPressureError(num_queued_requests=9, max_queued_requests=8)])
    with pytest.raises(StoreError, match="could not take"):
        await _remote(handle).channel_settings("c")
    assert handle.calls == ["channel_settings"]
    events = [e async for e in _remote(_Handle([BackPressureError(9, 8)])).handle("c", "hello")]
    assert events == [Outcome(OutcomeKind.ERROR, BUSY)]


async def test_a_reply_whose_text_never_began_is_asked_again_but_a_reset_is_not() -> None:
    reply = Outcome(OutcomeKind.REPLY, "hi")
    handle = _Handle([ActorDiedError(), None], events=[reply])
    events = [e async for e in _remote(handle).handle("c", "hello")]
    assert events == [reply] and handle.calls == ["handle", "handle"]
    reset = _Handle([ActorDiedError(), None])
    events = [e async for e in _remote(reset).handle("c", "+reset")]
    assert events == [Outcome(OutcomeKind.ERROR, LOST)] and reset.calls == ["handle"]
