"""The SSE codec against WHATWG HTML §9.2 (vectors of ecosystem.md §3.2 and §3.3)."""

from __future__ import annotations

import ast
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resumable_stream import sse
from resumable_stream.sse import ServerSentEvent, SSEDecoder, encode_comment, encode_event

E = ServerSentEvent
BOM = b"\xef\xbb\xbf"
KIB = 1 << 10
MIB = 1 << 20


def decode(chunks: Iterable[bytes]) -> tuple[list[ServerSentEvent], SSEDecoder]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events, decoder


def pieces(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def splittings(raw: bytes, how: str) -> Iterator[list[bytes]]:
    if how == "whole":
        yield [raw]
    elif how == "split":
        for i in range(len(raw) + 1):
            yield [raw[:i], raw[i:]]
    else:
        yield pieces(raw, 1)


# §3.2, numbered as there. The retry vectors carry an event so that `event.retry` is checked too.
VECTORS: list[tuple[int, bytes, list[ServerSentEvent], int | None]] = [
    (1, b"data: hello\n\n", [E("hello")], None),
    (2, b"data:hello\n\n", [E("hello")], None),
    (3, b"data:  two\n\n", [E(" two")], None),
    (4, b"data: a\ndata: b\n\n", [E("a\nb")], None),
    (5, b"data\ndata\n\n", [E("\n")], None),
    (6, b"data: a\r\ndata: b\r\n\r\n", [E("a\nb")], None),
    (7, b"data: a\rdata: b\r\r", [E("a\nb")], None),
    (8, b"data: a\r\n\ndata: b\n\r\n", [E("a"), E("b")], None),
    (9, BOM + b"data: bom\n\n", [E("bom")], None),
    (10, BOM + BOM + b"data: x\n\n", [], None),
    (11, b": ping\n\ndata: x\n\n", [E("x")], None),
    (12, b"event: add\ndata: 1\n\n", [E("1", "add")], None),
    (13, b"event:\ndata: 1\n\n", [E("1")], None),
    (14, b"event: a\ndata: 1\n\ndata: 2\n\n", [E("1", "a"), E("2")], None),
    (15, b"event: x\n\n", [], None),
    (16, b"id: 7\n\ndata: x\n\n", [E("x", id="7")], None),
    (17, b"id: 1\ndata: a\n\ndata: b\n\n", [E("a", id="1"), E("b", id="1")], None),
    (18, b"id: 1\ndata: a\n\nid\ndata: b\n\n", [E("a", id="1"), E("b", id="")], None),
    (19, b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n", [E("a", id="1"), E("b", id="1")], None),
    (20, b"id: 1\ndata: a\n\n\n\n", [E("a", id="1")], None),
    (21, b"retry: 3000\ndata: x\n\n", [E("x", retry=3000)], 3000),
    (22, b"retry: 30s\ndata: x\n\n", [E("x")], None),
    (23, b"retry: +300\ndata: x\n\n", [E("x")], None),
    (24, b"retry: 1_000\ndata: x\n\n", [E("x")], None),
    (25, "retry: ١٢\ndata: x\n\n".encode(), [E("x")], None),
    (26, b"retry:  300\ndata: x\n\n", [E("x")], None),
    (27, b"foo: bar\ndata: x\n\n", [E("x")], None),
    (28, b"Data: x\n\n", [], None),
    (29, b"data\n\n", [E("")], None),
    (30, b"data: a: b\n\n", [E("a: b")], None),
    (31, b"data: a\n\ndata: b", [E("a")], None),
    (32, b"data: a\ndata: b\n", [], None),
    (33, "data: hé€😀\n\n".encode(), [E("hé€😀")], None),
    (34, b'data: {"a":1}\n\ndata: [DONE]\n\n', [E('{"a":1}'), E("[DONE]")], None),
]


@pytest.mark.parametrize("how", ["whole", "split", "bytes"])
@pytest.mark.parametrize(
    ("raw", "expected", "retry"), [v[1:] for v in VECTORS], ids=[f"v{v[0]}" for v in VECTORS]
)
def test_spec_vector(raw: bytes, expected: list[ServerSentEvent], retry: int | None, how: str):
    for chunks in splittings(raw, how):
        events, decoder = decode(chunks)
        assert events == expected, chunks
        assert decoder.retry == retry


def test_vectors_are_all_there():
    assert [v[0] for v in VECTORS] == list(range(1, 35))


# Encoding, BOM and line ends


def test_always_utf8_whatever_the_charset():
    # The decoder takes bytes and has no charset parameter: `charset=iso-8859-1` in the
    # Content-Type changes nothing. Latin-1 bytes are invalid UTF-8 and become U+FFFD.
    assert decode([b"data: \xe9t\xe9\n\n"])[0] == [E("\ufffdt\ufffd")]
    assert decode(["data: été\n\n".encode()])[0] == [E("été")]


def test_invalid_and_truncated_utf8():
    assert decode([b"data: a\xffb\xc3\n\n"])[0] == [E("a\ufffdb\ufffd")]
    # A character cut off by the end of the stream is part of an unfinished line: discarded.
    assert decode([b"data: a\n\ndata: \xe2\x82"])[0] == [E("a")]


@pytest.mark.parametrize(
    ("text", "data"),
    [("data: hé€😀\n\n", "hé€😀"), ("data: 😀😀\r\n\r\n", "😀😀"), ("é: x\ndata: 😀\r\r", "😀")],
)
def test_multibyte_characters_split_at_every_pair_of_positions(text: str, data: str):
    raw = text.encode()
    expected = [E(data)]
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            assert decode([raw[:i], raw[i:j], raw[j:]])[0] == expected


def test_bom_split_across_feeds_is_stripped():
    for chunks in (
        [BOM[:1], BOM[1:2], BOM[2:], b"data: x\n\n"],
        [b"", BOM[:2], BOM[2:] + b"data: x\n\n"],
    ):
        assert decode(chunks)[0] == [E("x")]


def test_only_the_first_bom_is_stripped():
    # A second BOM is content: here it starts the field name, which is then unknown.
    assert decode([BOM + b"data: 1\n\n" + BOM + b"data: 2\n\n"])[0] == [E("1")]
    assert decode([b"data: " + BOM + b"x\n\n"])[0] == [E("\ufeffx")]
    assert decode([BOM + BOM + b"\n" + b"data: x\n\n"])[0] == [E("x")]


def test_bom_prefix_that_is_no_bom_is_kept():
    assert decode([b"\xef\xbb", b"x\ndata: 1\n\n"])[0] == [E("1")]
    assert decode([b"data: \xef\xbb", b"\n\n"])[0] == [E("\ufffd")]


def test_cr_at_the_end_of_a_feed_ends_the_line_at_once():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [E("a")]  # no waiting for a possible LF
    assert decoder.feed(b"\ndata: b\r") == []  # that LF belongs to the CR before it
    assert decoder.feed(b"data: c\r") == []
    assert decoder.feed(b"\r") == [E("b\nc")]


def test_cr_then_lf_in_separate_feeds_is_one_line_end():
    # Were the LF a second line end, it would be a blank line dispatching "a" on its own.
    for chunks in (
        [b"data: a\r", b"\n", b"data: b\n\n"],
        [b"data: a\r", b"", b"\ndata: b\n\n"],
        [b"data: a\r", b"\n", b"", b"data: b\n\n"],
    ):
        assert decode(chunks)[0] == [E("a\nb")], chunks


def test_only_cr_lf_and_crlf_end_lines():
    # Characters that `str.splitlines` would split on are content.
    data = "a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g"
    assert decode([f"data: {data}\n\n".encode()])[0] == [E(data)]


def test_cr_at_the_very_end_of_the_stream():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.feed(b"\r") == [E("x")]
    assert decoder.close() == []
    # A CR that ends the last line with no blank line after: the event is discarded.
    assert decode([b"data: x\r"])[0] == []
    assert decode([b"data: x\n\r"])[0] == [E("x")]


# Ids, retry, close


def test_last_event_id_survives_a_block_without_data():
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 5\n\n") == []
    assert decoder.last_event_id == "5"
    assert decoder.feed(b"data: x\n\n") == [E("x", id="5")]


def test_a_block_without_data_resets_the_event_type():
    assert decode([b"event: x\n\ndata: y\n\n"])[0] == [E("y")]


def test_an_unfinished_block_does_not_move_the_last_event_id():
    # Its event was never delivered: resuming after its id would skip it.
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n")
    assert decoder.last_event_id == "1"
    assert decoder.close() == []
    assert decoder.last_event_id == "1"


def test_id_and_retry_persist_across_close():
    decoder = SSEDecoder()
    decoder.feed(b"retry: 1500\nid: 3\ndata: a\n\n")
    decoder.close()
    # The next connection's body: its BOM is stripped again and the id carries on.
    assert decoder.feed(BOM + b"data: b\n\n") == [E("b", id="3", retry=1500)]
    assert decoder.feed(b"id\ndata: c\n\n") == [E("c", id="", retry=1500)]


def test_close_discards_pending_state():
    decoder = SSEDecoder()
    decoder.feed(b"event: x\ndata: a\ndat")
    assert decoder.close() == []
    assert decoder.feed(b"a: b\n\n") == []  # "a: b" was a fresh line, not the end of "dat"
    assert decoder.feed(b"data: c\n\n") == [E("c")]


def test_retry_in_effect_and_later_invalid_values():
    decoder = SSEDecoder()
    assert decoder.retry is None
    decoder.feed(b"retry: 0\nretry: 2000\nretry\nretry:\nretry: -1\nretry: \xc2\xb2\n")
    assert decoder.retry == 2000
    assert decoder.feed(b"data: x\n\n") == [E("x", retry=2000)]


def test_an_id_of_100_000_characters():
    value = "7" * 100_000
    raw = f"id: {value}\ndata: x\n\n".encode()
    for chunks in ([raw], pieces(raw, KIB)):
        events, decoder = decode(chunks)
        assert events == [E("x", id=value)]
        assert decoder.last_event_id == value


# Size and cost


def test_a_1_mib_data_line_in_1_kib_pieces():
    value = "".join(chr(ord("a") + i % 26) for i in range(26)) * (MIB // 26)
    raw = f"data: {value}\n\n".encode()
    decoder = SSEDecoder()
    out = [event for chunk in pieces(raw, KIB) for event in decoder.feed(chunk)]
    assert out == [E(value)]


def test_a_long_line_in_small_pieces_costs_linear_time():
    # 16 Ki feeds of 1 KiB: re-scanning or re-copying the pending line per feed would move
    # about 128 GiB and take minutes; a linear decoder needs a fraction of a second.
    decoder = SSEDecoder()
    chunk = b"x" * KIB
    start = time.perf_counter()
    assert decoder.feed(b"data: ") == []
    for _ in range(16 * KIB):
        assert decoder.feed(chunk) == []
    (event,) = decoder.feed(b"\n\n")
    assert time.perf_counter() - start < 5
    assert len(event.data) == 16 * MIB


@pytest.mark.parametrize("size", [None, 7, KIB])
def test_10_000_comment_lines_then_an_event(size: int | None):
    raw = b": keep-alive\n" * 10_000 + b"data: x\n\n"
    events, _ = decode([raw] if size is None else pieces(raw, size))
    assert events == [E("x")]


# Encoder

ENCODED = [
    ({"data": "hello"}, "data: hello\n\n"),
    ({"data": ""}, "data: \n\n"),
    ({}, "data: \n\n"),
    ({"data": "a\nb"}, "data: a\ndata: b\n\n"),
    ({"data": "a\rb"}, "data: a\ndata: b\n\n"),
    ({"data": "a\r\nb"}, "data: a\ndata: b\n\n"),
    ({"data": "a\n"}, "data: a\ndata: \n\n"),
    ({"data": " two"}, "data:  two\n\n"),
    ({"data": "1", "event": "add"}, "event: add\ndata: 1\n\n"),
    ({"data": "1", "event": "a\r\nb\r"}, "event: ab\ndata: 1\n\n"),
    ({"data": "1", "id": "a\r\nb"}, "id: ab\ndata: 1\n\n"),
    ({"data": "1", "id": 7}, "id: 7\ndata: 1\n\n"),
    ({"data": "1", "id": ""}, "id: \ndata: 1\n\n"),
    ({"data": "1", "retry": 1500}, "retry: 1500\ndata: 1\n\n"),
    ({"data": "1", "retry": 0}, "retry: 0\ndata: 1\n\n"),
    ({"data": "1", "comment": "keep\nalive"}, ": keep\n: alive\ndata: 1\n\n"),
    ({"data": "1", "comment": ""}, ":\ndata: 1\n\n"),
    (
        {"data": "x\ny", "event": "e", "id": "9", "retry": 10, "comment": "c"},
        ": c\nevent: e\nid: 9\nretry: 10\ndata: x\ndata: y\n\n",
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), ENCODED)
def test_encode_event(kwargs, expected: str):
    assert encode_event(**kwargs) == expected
    (event,) = decode([expected.encode()])[0]
    assert event.data == kwargs.get("data", "").replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ":\n\n"),
        ("ping", ": ping\n\n"),
        ("keep\nalive", ": keep\n: alive\n\n"),
        ("a\r\n", ": a\n:\n\n"),
    ],
)
def test_encode_comment(text: str, expected: str):
    assert encode_comment(text) == expected
    assert decode([expected.encode()])[0] == []


def test_a_comment_frame_between_events_changes_nothing():
    raw = encode_event("a", id="1") + encode_comment("ping") + encode_event("b")
    assert decode([raw.encode()])[0] == [E("a", id="1"), E("b", id="1")]


def test_encode_rejects_what_the_client_would_ignore():
    with pytest.raises(ValueError, match="NUL"):
        encode_event("x", id="a\x00b")
    with pytest.raises(ValueError, match="negative"):
        encode_event("x", retry=-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": None},
        {"data": b"x"},
        {"data": "x", "retry": "1500"},
        {"data": "x", "retry": True},
        {"data": "x", "retry": 1.5},
        {"data": "x", "id": True},
        {"data": "x", "id": 1.5},
    ],
)
def test_encode_rejects_wrong_types(kwargs):
    with pytest.raises(TypeError):
        encode_event(**kwargs)


# Round trip. A CR in data cannot round-trip (it reaches the client as LF), so data has none;
# CR and LF are stripped from event and id, and NUL in an id is refused, so those have none.
# Surrogates are excluded: a lone one cannot be sent as UTF-8 at all.
no_cr = st.text(st.characters(exclude_characters="\r", exclude_categories=["Cs"]), max_size=20)
one_line = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=10)
events_st = st.tuples(
    no_cr,
    st.none() | one_line,
    st.none() | one_line.filter(lambda s: "\0" not in s) | st.integers(min_value=0),
)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(events_st, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0)),
    way=st.integers(0, 2),
)
def test_round_trip(
    events: list[tuple[str, str | None, str | int | None]], cuts: list[int], way: int
):
    raw = "".join(encode_event(data, event=event, id=id) for data, event, id in events).encode()
    if way == 0:
        chunks = [raw]
    elif way == 1:
        chunks = pieces(raw, 1)
    else:
        bounds = sorted({0, len(raw), *(cut % (len(raw) + 1) for cut in cuts)})
        chunks = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    expected, last_id = [], ""
    for data, event, id in events:
        last_id = last_id if id is None else str(id)
        expected.append(E(data, event or "message", last_id))
    assert decode(chunks)[0] == expected


# The module itself


def test_public_api():
    assert sse.__all__ == sorted(sse.__all__)
    assert set(sse.__all__) == {"SSEDecoder", "ServerSentEvent", "encode_comment", "encode_event"}
    assert ServerSentEvent() == E("", "message", "", None)
    with pytest.raises(AttributeError):
        E().data = "x"  # type: ignore[misc]


def test_imports_only_the_standard_library():
    tree = ast.parse(Path(sse.__file__).read_text())
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert {name.split(".")[0] for name in modules} <= sys.stdlib_module_names
