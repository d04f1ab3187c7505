"""The wire messages: one type per message, each packed and parsed by itself, and anything else
on a channel (another program's message, a corrupted or hostile one) a ValueError, never a
message, never another exception."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import resumable_stream._protocol as p

MESSAGES: list[Any] = [
    p.Request("l1", "reply:x", 17, False, 4096),
    p.Request("l1", "reply:x", 0, True, 1, "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
    p.Cancel(),
    p.Replay("l1", "tok", 5, ["ab", ["cd", "name", 300]], True, 9, True),
    p.Replay("l1", "tok", 0, [], False, None),
    p.Live("tok", 12, ["é\U0001f600", "x"], False),
    p.Heartbeat("tok", 42),
    p.End(None, "tok", 99, p.DONE, None),
    p.End("l1", "tok", 3, p.FAILED, "ValueError"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_parses_back_to_itself(message: Any) -> None:
    packed = message.pack()
    assert isinstance(packed, bytes)
    assert packed[:1] == type(message).TAG
    assert p.parse(packed) == message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",  # another program's text on our channel
        b'X["l"]',  # an unknown tag
        b"L",  # a tag and nothing
        b"Lnot json",
        b'L{"producer": "tok"}',  # not an array
        b'L["tok", 1]',  # too few fields
        b'L["tok", 1, [], false, "extra"]',  # too many
        b'L["tok", -1, [], false]',  # a negative offset
        b'L["tok", 1.5, [], false]',  # not an integer
        b'L["tok", true, [], false]',  # a bool is not an offset
        b"L[7, 1, [], false]",  # a producer that is not a string
        b'L["tok", 1, "ab", false]',  # chunks that are not a list
        b'L["tok", 1, [3], false]',  # a chunk that is neither text nor [text, event, retry]
        b'L["tok", 1, [["a"]], false]',
        b'L["tok", 1, [], "no"]',  # a flag that is not a bool
        b'H["tok"]',
        b'E[null, "tok", 3, "SOMETHING", null]',  # not a terminal state
        b'Q["l", "r", 0, false, 0, null, null]',
        b"L" + b"[" * 100_000,  # nested too deep for json: RecursionError inside
        b'L["tok", 1, ["\xff\xfe"], false]',  # not UTF-8
    ],
)
def test_anything_else_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (the message does not matter)
        p.parse(data)


@given(st.binary(max_size=200))
def test_random_bytes_are_a_message_or_a_value_error(data: bytes) -> None:
    try:
        message = p.parse(data)
    except ValueError:
        return
    assert p.parse(message.pack()) == message


@given(
    st.sampled_from(MESSAGES),
    st.integers(min_value=1, max_value=40),
    st.binary(min_size=1, max_size=4),
)
def test_a_corrupted_message_is_a_message_or_a_value_error(
    message: Any, at: int, junk: bytes
) -> None:
    packed = message.pack()
    corrupted = packed[:at] + junk + packed[at + len(junk) :]
    try:
        parsed = p.parse(corrupted)
    except ValueError:
        return
    assert p.parse(parsed.pack()) == parsed
