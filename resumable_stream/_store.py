"""A durable stream's text in the backend, written by its producer.

The text goes into a log (a Redis Stream on Redis) under the stream's keys, one entry per batch
of whole chunks at the id (its start offset, 1), and the end as a last entry at (length, 2),
with the state (Redis allows no entry at 0-0). A task of its own appends whatever was produced
since the last write, at most every `flush_interval` seconds, in one atomic command that also
refreshes the TTL and publishes the same batch to followers: the producer's own reader never
waits for it. Each entry is keyed by the producer's token, so a reader never takes two
producers' text for one.

What a reader needs to find a batch: the entry's id holds its start offset, its value is the
JSON list of the batch's chunks (a chunk yielded as an `Event` as [text, event, retry]).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import anyio

from . import _protocol as p
from ._backend import LogAppend, LogEntry, LogId
from ._buffer import ChunkBuffer, Signal
from ._exceptions import BackendError
from ._hub import Hub

logger = logging.getLogger("resumable_stream")

_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH, END = 1, 2  # the seq part of an entry's id
_LAST = 1 << 62  # past any offset: reading from it gives the log's last entry
# Characters per entry at most. A reader resuming mid-entry fetches and decodes the whole entry
# before its first chunk, so entries stay small; and Redis allocates each large entry in a size
# class of its allocator (jemalloc: 32 KiB, 40 KiB, ...), so a batch of 64-character chunks this
# long (about 31 KiB as JSON) fills the 32 KiB class instead of spilling into the next one.
ENTRY_CHARS = 30_000

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def pack_end(state: str, detail: str | None) -> bytes:
    return _dumps({"state": state, "detail": detail}).encode("utf-8", "surrogatepass")


class Store:
    __slots__ = (
        "_broken",
        "_buffer",
        "_changed",
        "_channel",
        "_hub",
        "_key",
        "_last",
        "_lock",
        "_sentinel",
        "_stream_id",
        "_token",
        "_unsure",
        "sent_at",
        "stored",
        "stored_changed",
    )

    def __init__(
        self, hub: Hub, stream_id: str, token: str, buffer: ChunkBuffer, changed: Signal
    ) -> None:
        self._hub = hub
        self._stream_id = stream_id
        self._token = token
        self._buffer = buffer
        self._changed = changed  # the producer's: notified for every chunk, and at the end
        self._key = hub.keys.text(stream_id)
        self._channel = hub.keys.live(stream_id)
        self._sentinel = hub.keys.sentinel(stream_id)
        self.stored = 0  # chunks stored so far
        # When text was last sent: each write gives the stream's keys their TTL again (or makes
        # them again, running, if they expired), whenever it lands: so they may run until then
        # plus the TTL, and the end is worth writing until then. (A write of the end makes
        # them again ended, which does no harm.)
        self.sent_at = anyio.current_time()
        self.stored_changed = Signal()
        self._last: LogId | None = None  # the id of the last entry written
        self._broken = False  # the log lost entries (Redis evicted or lost it): write it again
        # The end (a chunk index) of a write that failed without saying whether it landed (a
        # lost reply): the next write sends the very same entries first. An append skips an
        # entry whose id is there already, so a retry with more chunks under the same id
        # would lose the difference if the first try had landed.
        self._unsure: int | None = None
        # One write at a time: the appending task, the end, a rewrite after an outage.
        self._lock = anyio.Lock()

    @property
    def stored_length(self) -> int:
        return self._buffer.start_of(self.stored)

    async def run(self, ended: Callable[[], bool]) -> None:
        """Append what is produced, in batches, until the producer `ended()` and all is stored.

        A failed write is retried with backoff: the text is in memory, and the next write
        takes everything not stored yet.
        """
        buffer = self._buffer
        interval = self._hub.settings.flush_interval
        failures = 0
        while True:
            while self.stored == len(buffer.chunks):
                if ended():
                    return
                await self._changed.wait()
            if interval and not ended() and not failures:
                await anyio.sleep(interval)  # a window for the batch to grow: one write
            try:
                await self._write_up_to(len(buffer.chunks))
                if self._broken:
                    await self._rewrite(None)
            except BackendError as exc:
                level = logging.DEBUG if failures else logging.WARNING
                logger.log(
                    level,
                    "could not store stream %r: %s",
                    self._stream_id,
                    exc,
                    extra={"stream_id": self._stream_id},
                )
                await anyio.sleep(_RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)])
                failures += 1
                continue
            if failures:
                logger.warning(
                    "stream %r is stored again",
                    self._stream_id,
                    extra={"stream_id": self._stream_id},
                )
            failures = 0

    async def _write_up_to(self, stop: int) -> None:
        async with self._lock:
            while self.stored < stop:
                self.stored = await self._write(self.stored, stop)
                self.stored_changed.notify()

    async def _write(self, index: int, stop: int) -> int:
        """Append chunks `index` to `stop` (about `max_message_size` characters of them at
        most, at least one chunk) in one command; return the index after the last one written.
        """
        if self._unsure is not None:
            stop = min(stop, self._unsure)  # the same entries as the try that may have landed
        try:
            written = await self._write_entries(index, stop)
        except BackendError:
            self._unsure = stop
            raise
        self._unsure = None
        return written

    async def _write_entries(self, index: int, stop: int) -> int:
        budget = self._hub.settings.max_message_size
        first = self._buffer.start_of(index)
        entries: list[LogAppend] = []
        while index < stop and (not entries or self._buffer.start_of(index) - first < budget):
            entry, index = self._entry(index, stop)
            entries.append(entry)
        await self._append(entries)
        return index

    def _entry(self, index: int, stop: int) -> tuple[LogAppend, int]:
        """The entry of chunks `index` on (whole ones, about `ENTRY_CHARS` characters or
        `max_message_size` if less, at least one), and the index after its last chunk."""
        buffer = self._buffer
        largest = self._hub.settings.max_message_size
        limit = min(largest, ENTRY_CHARS)
        start = buffer.start_of(index)
        # The chunk holding the limit's last character goes in only if it ends by the limit.
        last = buffer.index_at(start + limit - 1)
        fits = last < len(buffer.chunks) and buffer.ends[last] <= start + limit
        end_index = min(stop, max(index + 1, last + 1 if fits else last))
        chunks = buffer.wire(start, end_index)
        end = buffer.start_of(end_index)
        if end - start <= largest:
            message = p.Live(self._token, start, chunks, False).pack()
        else:
            # A chunk too large for one message: followers learn its length, and read it from
            # the log.
            message = p.Heartbeat(self._token, end).pack()
        value = _dumps(chunks).encode("utf-8", "surrogatepass")
        return ((start, BATCH), value, message), end_index

    async def _append(self, entries: list[LogAppend], state: str | None = None) -> None:
        hub = self._hub
        if state is None:
            self.sent_at = anyio.current_time()
        previous = await hub.connection.append(
            self._key,
            entries,
            self._token,
            hub.settings.ttl,
            self._channel,
            self._sentinel,
            state,
        )
        first = entries[0][0]
        if previous != self._last and not (previous is not None and previous >= first):
            self._broken = True  # what this producer wrote last is not there any more
        self._last = entries[-1][0]

    async def write_end(self, state: str, detail: str | None, *, retry: bool = False) -> bool:
        """Store what is left, then the end with the stream's state, and announce it: one
        command for the end. False if the backend failed (the caller retries)."""
        try:
            await self._write_up_to(len(self._buffer.chunks))
            length = self._buffer.length
            end = p.End(None, self._token, length, state, detail).pack()
            async with self._lock:
                entry = ((length, END), pack_end(state, detail), end)
                await self._append([entry], p.sentinel_value(state))
            if self._broken:
                await self._rewrite((state, detail))
        except BackendError as exc:
            level = logging.DEBUG if retry else logging.WARNING  # warned once is enough
            logger.log(
                level,
                "could not store the end of stream %r (%s)",
                self._stream_id,
                exc,
                extra={"stream_id": self._stream_id},
            )
            return False
        return True

    async def repair(self, ended: tuple[str, str | None] | None) -> None:
        """After the backend came back: if its log lost entries (a restart without
        persistence, a failover that dropped writes), write it all again from memory."""
        connection = self._hub.connection
        first = await connection.read(self._key, 0, 1)
        last = await connection.read(self._key, _LAST, 1)
        whole = (not first and self._last is None) or (
            bool(first)
            and first[0][:2] in ((0, BATCH), (0, END))
            and bool(last)
            and last[0][:2] == self._last
        )
        if not whole:
            await self._rewrite(ended)

    async def _rewrite(self, ended: tuple[str, str | None] | None) -> None:
        logger.warning(
            "the stored text of stream %r was lost (evicted, a Redis restart or failover?); "
            "storing it again",
            self._stream_id,
            extra={"stream_id": self._stream_id},
        )
        async with self._lock:
            await self._hub.connection.delete(self._key)
            self._last = None
            stored, self.stored = self.stored, 0
            while self.stored < stored:
                self.stored = await self._write(self.stored, stored)
            if ended is not None:
                length = self._buffer.length
                end = p.End(None, self._token, length, *ended).pack()
                state = p.sentinel_value(ended[0])
                await self._append([((length, END), pack_end(*ended), end)], state)
            self._broken = False


def parse(entry: LogEntry) -> p.Live | p.End:
    """A log entry as the message it stands for: a batch (`Live`) or the end; ValueError if it
    is not one of ours."""
    offset, seq, token, value = entry
    try:
        decoded = json.loads(value.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError("malformed log entry") from exc
    if seq == BATCH:
        return p.Live.parse([token, offset, decoded, False])
    if seq == END and isinstance(decoded, dict):
        return p.End.parse([None, token, offset, decoded.get("state"), decoded.get("detail")])
    raise ValueError("malformed log entry")
