"""The commands of one context: queued, then sent together as one pipeline by one task.

Concurrent streams share round trips this way, whatever their number. On a Redis Cluster the
pipeline is redis-py's cluster pipeline, which splits a batch by node and follows redirections;
every command still gets its own answer or error. Publishes are `SPUBLISH` there, so a stream's
messages stay in its shard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import redis.exceptions
from redis.asyncio import Redis, RedisCluster

from .._backend import LogEntry, LogId
from .._buffer import Signal
from .._exceptions import BackendError
from ._errors import deadline, text

logger = logging.getLogger("resumable_stream")

# Eviction may delete a running stream's keys (every key has a TTL, so volatile-* policies
# qualify too): a second producer could then start under the same id.
_SAFE_POLICIES = frozenset({"noeviction"})

Command = Callable[[Any], object]  # given a pipeline, adds one command to it


class _Pending:
    __slots__ = ("command", "done", "error", "idempotent", "result")

    def __init__(self, command: Command, idempotent: bool) -> None:
        self.command = command
        # Idempotent commands may be sent again after a connection failure: running them
        # twice changes nothing (our protocol takes a PUBLISHed message twice as once).
        self.idempotent = idempotent
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Retryable(Exception):
    """A batch failed on its connection; `error` is what its commands fail with."""

    def __init__(self, error: BackendError) -> None:
        self.error = error


def _settle(
    batch: list[_Pending], which: Callable[[_Pending], bool] | None, error: BackendError
) -> None:
    for pending in batch:
        if which is None or which(pending):
            pending.error = error
            pending.done.set()


def _reply(pending: _Pending) -> Any:
    """A command's reply; its error reply (or the batch's failure) as `BackendError`."""
    error = pending.error
    if error is None:
        return pending.result
    if isinstance(error, BackendError):
        raise error
    raise BackendError(f"Redis error: {error}") from error


def _holds_no_integer(error: BaseException | None) -> bool:
    # INCR's answer when the key holds a string that is not a number (our terminal states).
    # Every other error reply (OOM, MOVED, READONLY, NOPERM, WRONGTYPE...) is a failure.
    return isinstance(error, redis.exceptions.ResponseError) and "not an integer" in str(error)


class Commands:
    def __init__(self, client: Redis | RedisCluster, timeout: float, *, sharded: bool) -> None:
        self._client = client
        self._timeout = timeout
        self._publish = "SPUBLISH" if sharded else "PUBLISH"
        self._queue: list[_Pending] = []
        self._queued = Signal()
        self._closed = False
        self._busy_since: float | None = None  # when the batch in flight went out
        self._scope = anyio.CancelScope()  # the sending task's; the watchdog cancels it
        self._stalled: BackendError | None = None  # why the watchdog cancelled it

    def close(self) -> None:
        self._closed = True
        batch, self._queue = self._queue, []
        _settle(batch, None, BackendError("the context was closed"))

    def _enqueue(self, command: Command, idempotent: bool = True) -> _Pending:
        if self._closed:
            raise BackendError("the context was closed")
        pending = _Pending(command, idempotent)
        self._queue.append(pending)
        self._queued.notify()
        return pending

    async def _call(self, command: Command, idempotent: bool = True) -> Any:
        pending = self._enqueue(command, idempotent)
        await pending.done.wait()
        return _reply(pending)

    async def run(self) -> None:
        """The task that sends everything queued meanwhile as one pipeline, again and again.

        A watchdog, not a cancel scope per batch (which costs more than a small batch's own
        work), bounds each batch: one that Redis has not answered after `command_timeout`
        (checked twice per timeout) is cancelled, its commands fail, and its connection is
        dropped (redis-py disconnects a connection whose read was cancelled).
        """
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            while True:
                with anyio.CancelScope() as scope:
                    self._scope = scope
                    await self._send_all()

    async def _send_all(self) -> None:
        while True:
            while not self._queue:
                await self._queued.wait()
            batch, self._queue = self._queue, []
            self._busy_since = anyio.current_time()
            try:
                await self._send(batch)
            finally:
                self._busy_since = None
                # Not kept while waiting for the next: a burst of 1,000 new streams left its
                # 2,000 settled commands alive until then (0.7 KiB a stream, in the figures).
                del batch

    async def _watch(self) -> None:
        while True:
            await anyio.sleep(self._timeout / 2)
            since = self._busy_since
            if since is not None and anyio.current_time() - since >= self._timeout:
                self._stalled = BackendError(
                    f"Redis did not answer a command within {self._timeout}s (command_timeout)"
                )
                self._scope.cancel()

    async def _send(self, batch: list[_Pending]) -> None:
        """Send a batch as one pipeline and settle each of its commands."""
        try:
            try:
                results = await self._execute(batch)
            except _Retryable as exc:
                # A connection that broke since its last use (a Redis restart, say) fails its
                # first command; the pipeline reconnects, so what is safe to send twice gets
                # one more try.
                _settle(batch, lambda pending: not pending.idempotent, exc.error)
                batch = [pending for pending in batch if pending.idempotent]
                results = await self._execute(batch) if batch else []
        except _Retryable as exc:
            _settle(batch, None, exc.error)
            return
        except BackendError as exc:
            _settle(batch, None, exc)
            return
        except BaseException:
            stalled, self._stalled = self._stalled, None
            _settle(batch, None, stalled or BackendError("command aborted"))
            raise
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                pending.error = result
            else:
                pending.result = result
            pending.done.set()

    async def _execute(self, batch: list[_Pending]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for pending in batch:
            pending.command(pipe)
        try:
            return await pipe.execute(raise_on_error=False)
        except (redis.exceptions.ConnectionError, ConnectionError) as exc:
            raise _Retryable(BackendError(f"Redis connection error: {exc}")) from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BackendError(f"Redis error: {exc}") from exc

    async def check_eviction_policy(self) -> None:
        """Warn once if Redis may evict our keys (best effort: CONFIG may be forbidden).

        Sent with the other commands, so it costs no connection of its own; on a cluster it
        asks one node, whose configuration the others normally share.
        """
        try:
            answer = await self._call(lambda pipe: pipe.execute_command("CONFIG GET", "maxmemory*"))
        except BackendError as exc:
            logger.debug("could not read Redis' eviction policy: %s", exc)
            return
        if isinstance(answer, list):  # RESP2 gives the pairs flat
            answer = dict(zip(answer[::2], answer[1::2], strict=True))
        config = {text(k): text(v) for k, v in dict(answer).items()}
        policy = config.get("maxmemory-policy")
        if config.get("maxmemory") not in (None, "0") and policy not in (None, *_SAFE_POLICIES):
            logger.warning(
                "Redis evicts keys under memory pressure (maxmemory-policy %s): a running "
                "stream whose keys are evicted cannot be resumed, and readers get "
                "ProducerConflictError if a second producer starts under its id; use "
                "maxmemory-policy noeviction for resumable streams",
                policy,
            )

    async def ping(self) -> None:
        """One command straight away, before the sending task runs."""
        try:
            with deadline(self._timeout, "PING"):
                await self._client.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BackendError(f"Redis error: {exc}") from exc

    # The commands of the Connection protocol

    async def incr(self, key: str, ttl: int) -> int | None:
        # redis-py's `incr` sends INCRBY; the raw command keeps the protocol to a plain INCR.
        incr = self._enqueue(lambda pipe: pipe.execute_command("INCR", key), idempotent=False)
        expire = self._enqueue(lambda pipe: pipe.expire(key, ttl))
        await incr.done.wait()
        await expire.done.wait()
        if _holds_no_integer(incr.error):
            _reply(expire)
            return None  # the key holds a terminal state: the stream finished
        value = _reply(incr)
        _reply(expire)
        return int(value)

    async def get(self, key: str) -> str | None:
        return text(await self._call(lambda pipe: pipe.get(key)))

    async def set(self, key: str, value: str, ttl: int) -> None:
        await self._call(lambda pipe: pipe.set(key, value, ex=ttl))

    async def swap(self, key: str, value: str, ttl: int) -> str | None:
        return text(
            await self._call(lambda pipe: pipe.set(key, value, ex=ttl, get=True), idempotent=False)
        )

    async def create(self, key: str, value: str, ttl: int) -> bool:
        created = await self._call(
            lambda pipe: pipe.set(key, value, ex=ttl, nx=True), idempotent=False
        )
        return bool(created)

    async def publish(self, channel: str, message: bytes) -> int:
        command = self._publish
        return int(await self._call(lambda pipe: pipe.execute_command(command, channel, message)))

    # Durable streams: a Redis Stream per stream, entry ids `<offset>-<seq>`.

    async def append(
        self,
        key: str,
        entry: LogId,
        field: str,
        value: bytes,
        ttl: int,
        channel: str,
        message: bytes,
        sentinel: str,
        state: str | None = None,
    ) -> LogId | None:
        keys = [key, channel, sentinel]
        args: list[Any] = [f"{entry[0]}-{entry[1]}", field, value, ttl, self._publish, message]
        if state is not None:
            args.append(state)
        last = text(
            await self._call(
                lambda pipe: pipe.execute_command("EVAL", _APPEND, len(keys), *keys, *args)
            )
        )
        if not last:
            return None
        offset, _, seq = last.partition("-")
        return int(offset), int(seq)

    async def read(self, key: str, offset: int, count: int) -> list[LogEntry]:
        # The entry that holds `offset` (the last one at or before it), then those after it:
        # two commands, one round trip.
        at = f"{offset}-1"
        before = self._enqueue(lambda pipe: pipe.xrevrange(key, at, "-", count=1))
        after = self._enqueue(lambda pipe: pipe.xrange(key, f"({at}", "+", count=count))
        await before.done.wait()
        await after.done.wait()
        entries = []
        for entry_id, fields in [*_reply(before), *_reply(after)][:count]:
            ms, _, seq = text(entry_id).partition("-")  # type: ignore[union-attr]
            [(field, value)] = fields.items()
            entries.append((int(ms), int(seq), text(field) or "", value))
        return entries

    async def delete(self, key: str) -> None:
        await self._call(lambda pipe: pipe.delete(key))


# Appends an entry to a durable stream's log unless an entry at or after its id is there (so a
# retried append adds nothing), refreshes the TTL, sets the stream's state if one is given (else
# sets it running if a restart lost it), and publishes the message: atomic, one round trip.
# Returns the id of the log's last entry before (empty if none). KEYS: log, channel, state key.
# ARGV: id, field, value, ttl, publish command, message[, state]. The channel is a KEY so that a
# cluster checks that it lives in the log's slot, as SPUBLISH in a script requires.
_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local fresh = true
local previous = ''
if #last > 0 then
  previous = last[1][1]
  local lo, ls = string.match(previous, '(%d+)-(%d+)')
  local no, ns = string.match(ARGV[1], '(%d+)-(%d+)')
  lo, ls, no, ns = tonumber(lo), tonumber(ls), tonumber(no), tonumber(ns)
  fresh = no > lo or (no == lo and ns > ls)
end
if fresh then
  redis.call('XADD', KEYS[1], ARGV[1], ARGV[2], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[7] then
  redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[4])
end
redis.call(ARGV[5], KEYS[2], ARGV[6])
return previous
"""
