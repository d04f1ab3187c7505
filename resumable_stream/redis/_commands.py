"""The commands of one context: queued, then sent together as one pipeline by one task.

Concurrent streams share round trips this way, whatever their number. On a Redis Cluster a
batch is split by master (the slot of each command's key, from the cluster client's slot map)
and sent as a plain pipeline on one connection per master: redis-py's cluster pipeline costs
half as much again per round trip (policies, a task per node). A redirection (`MOVED`, `ASK`,
`TRYAGAIN`, `CLUSTERDOWN`: the node did not run the command) or a broken connection sends what
it concerns through redis-py's cluster pipeline instead, which follows redirections and
refreshes the slot map, and for a while after, until the topology has settled. Every command
still gets its own answer or error. Publishes are `SPUBLISH` there, so a stream's messages stay
in its shard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import redis.exceptions
from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry

from .._backend import LogAppend, LogEntry, LogId
from .._buffer import Signal
from .._exceptions import BackendError
from ._done import Done
from ._errors import NoBackoff, deadline, text

logger = logging.getLogger("resumable_stream")

# Eviction may delete a running stream's keys (every key has a TTL, so volatile-* policies
# qualify too): a second producer could then start under the same id.
_SAFE_POLICIES = frozenset({"noeviction"})

Command = Callable[[Any], object]  # given a pipeline, adds one command to it


# After a redirection or a broken connection on a cluster: how long batches go through
# redis-py's cluster pipeline, which refreshes the slot map, before masters are used directly.
_SETTLE = 2.0
_REDIRECTIONS = (
    redis.exceptions.AskError,
    redis.exceptions.MovedError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


class _Pending:
    __slots__ = ("command", "done", "error", "idempotent", "key", "result")

    def __init__(self, command: Command, idempotent: bool, key: str | None) -> None:
        self.command = command
        self.key = key  # what routes it on a cluster (a key, or a sharded channel)
        # Idempotent commands may be sent again after a connection failure: running them
        # twice changes nothing (our protocol takes a PUBLISHed message twice as once).
        self.idempotent = idempotent
        self.done = Done()
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


def _untyped(exc: Exception) -> BackendError:
    # Not a RedisError: redis-py failing in its own state (a read from two places at once
    # raised RuntimeError, a connection torn down under it AttributeError). It fails this
    # batch, as any error of the connection would; it must not end the task that sends the
    # next one, which would take the context down with it.
    return BackendError(f"the Redis client failed: {exc!r}")


def _redirected(result: object) -> bool:
    """Whether a cluster node answered that it did not run the command: the slot is elsewhere
    (or moving, or the cluster is down for it)."""
    if isinstance(result, _REDIRECTIONS):
        return True
    return isinstance(result, redis.exceptions.ResponseError) and str(result).startswith(
        ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")
    )


def _holds_no_integer(error: BaseException | None) -> bool:
    # INCR's answer when the key holds a string that is not a number (our terminal states).
    # Every other error reply (OOM, MOVED, READONLY, NOPERM, WRONGTYPE...) is a failure.
    return isinstance(error, redis.exceptions.ResponseError) and "not an integer" in str(error)


class Commands:
    def __init__(
        self,
        client: Redis | RedisCluster,
        timeout: float,
        *,
        sharded: bool,
        recovered: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        # Called when a batch is answered after one failed: Redis is back (the subscriber
        # then reconnects at once rather than at the end of its backoff).
        self._recovered = recovered
        self._failing = False
        self._timeout = timeout
        self._publish = "SPUBLISH" if sharded else "PUBLISH"
        self._queue: list[_Pending] = []
        self._queued = Signal()
        self._closed = False
        self._busy_since: float | None = None  # when the batch in flight went out
        self._scope = anyio.CancelScope()  # the sending task's; the watchdog cancels it
        self._stalled: BackendError | None = None  # why the watchdog cancelled it
        # A cluster's masters, by node name: one plain client each (see the module's doc).
        self._masters: dict[str, Redis] | None = {} if isinstance(client, RedisCluster) else None
        # After a topology change, when masters may be used directly again (0: none pending).
        self._direct_after = 0.0

    def close(self) -> None:
        self._closed = True
        batch, self._queue = self._queue, []
        _settle(batch, None, BackendError("the context was closed"))

    async def disconnect(self) -> None:
        """Close the connections to a cluster's masters."""
        masters, self._masters = self._masters, {} if self._masters is not None else None
        for client in (masters or {}).values():
            # A client given its pool leaves the pool's connections open: close them here.
            await client.aclose()
            await client.connection_pool.disconnect()

    def _enqueue(
        self, command: Command, idempotent: bool = True, key: str | None = None
    ) -> _Pending:
        if self._closed:
            raise BackendError("the context was closed")
        pending = _Pending(command, idempotent, key)
        self._queue.append(pending)
        self._queued.notify()
        return pending

    async def _call(self, command: Command, idempotent: bool = True, key: str | None = None) -> Any:
        pending = self._enqueue(command, idempotent, key)
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
            self._failing = True
            _settle(batch, None, exc.error)
            return
        except BackendError as exc:
            self._failing = True
            _settle(batch, None, exc)
            return
        except BaseException:
            self._failing = True
            stalled, self._stalled = self._stalled, None
            _settle(batch, None, stalled or BackendError("command aborted"))
            raise
        if self._failing:
            self._failing = False
            if self._recovered is not None:
                self._recovered()
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                pending.error = result
            else:
                pending.result = result
            pending.done.set()

    async def _execute(self, batch: list[_Pending]) -> list[Any]:
        if (
            self._masters is not None
            and anyio.current_time() >= self._direct_after
            and all(pending.key is not None for pending in batch)
        ):
            if self._direct_after:
                # The topology settled: redis-py's own connections go (one per master is ours).
                self._direct_after = 0.0
                await self._drop_cluster_connections()
            return await self._execute_on_masters(batch)
        return await self._execute_pipeline(batch)

    async def _execute_pipeline(self, batch: list[_Pending]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for pending in batch:
            pending.command(pipe)
        try:
            return await pipe.execute(raise_on_error=False)
        except (redis.exceptions.ConnectionError, ConnectionError) as exc:
            raise _Retryable(BackendError(f"Redis connection error: {exc}")) from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BackendError(f"Redis error: {exc}") from exc
        except Exception as exc:
            raise _untyped(exc) from exc

    async def _execute_on_masters(self, batch: list[_Pending]) -> list[Any]:
        """A cluster's batch, split by master, each part as a plain pipeline; what a node
        redirects goes through the cluster pipeline."""
        assert isinstance(self._client, RedisCluster)
        parts: dict[str, tuple[Redis, list[int]]] = {}
        try:
            for index, pending in enumerate(batch):
                assert pending.key is not None
                node = self._client.get_node_from_key(pending.key)
                if node is None:
                    return await self._settling(batch)
                part = parts.get(node.name)
                if part is None:
                    part = parts[node.name] = (self._master(node), [])
                part[1].append(index)
        except (redis.exceptions.RedisError, LookupError):
            return await self._settling(batch)  # no slot map: the cluster pipeline reads it
        results: list[Any] = [None] * len(batch)
        failures: list[Exception] = []

        async def send(client: Redis, indices: list[int]) -> None:
            pipe = client.pipeline(transaction=False)
            for index in indices:
                batch[index].command(pipe)
            try:
                answers = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the first one is raised below, once all parts are back
                failures.append(exc)
                return
            for index, result in zip(indices, answers, strict=True):
                results[index] = result

        try:
            if len(parts) == 1:
                [(client, indices)] = parts.values()
                await send(client, indices)
            else:
                async with anyio.create_task_group() as tg:
                    for client, indices in parts.values():
                        tg.start_soon(send, client, indices)
            if failures:
                raise failures[0]
        except (redis.exceptions.ConnectionError, ConnectionError) as exc:
            await self._settle_topology()
            raise _Retryable(BackendError(f"Redis connection error: {exc}")) from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BackendError(f"Redis error: {exc}") from exc
        except Exception as exc:
            raise _untyped(exc) from exc
        moved = [index for index, result in enumerate(results) if _redirected(result)]
        if moved:
            # Not run where they went: again, through the cluster pipeline.
            again = await self._settling([batch[index] for index in moved])
            for index, result in zip(moved, again, strict=True):
                results[index] = result
        return results

    async def _drop_cluster_connections(self) -> None:
        assert isinstance(self._client, RedisCluster)
        for node in self._client.get_nodes():
            await node.disconnect()

    async def _settling(self, batch: list[_Pending]) -> list[Any]:
        await self._settle_topology()
        return await self._execute_pipeline(batch)

    async def _settle_topology(self) -> None:
        """The topology changed: the cluster pipeline for a while, and new master clients."""
        self._direct_after = anyio.current_time() + _SETTLE
        await self.disconnect()

    def _master(self, node: Any) -> Redis:
        assert self._masters is not None
        client = self._masters.get(node.name)
        if client is None:
            kwargs = {k: v for k, v in node.connection_kwargs.items() if "maint" not in k}
            # No retry inside redis-py: a batch may hold an INCR, which must not run twice
            # (what is safe to send again is retried above).
            kwargs["retry"] = Retry(NoBackoff(), 0)
            # The watchdog bounds every batch: a socket timeout would only cost each write a
            # task (redis-py's `asyncio.wait_for`, Python 3.11 and older).
            kwargs["socket_timeout"] = None
            pool = ConnectionPool(connection_class=node.connection_class, **kwargs)
            client = self._masters[node.name] = Redis(connection_pool=pool)
        return client

    async def check_eviction_policy(self) -> None:
        """Warn once if Redis may evict our keys (best effort: CONFIG may be forbidden).

        Sent with the other commands, so it costs no connection of its own; on a cluster it
        asks one node, whose configuration the others normally share.
        """
        try:
            # On a cluster, the master of the slot of "" (any one does).
            answer = await self._call(
                lambda pipe: pipe.execute_command("CONFIG GET", "maxmemory*"), key=""
            )
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
                if isinstance(self._client, RedisCluster):
                    # The slot map is read (the subscriber connected): the connection redis-py
                    # read it on goes, and a master's connection of ours answers.
                    await self._drop_cluster_connections()
                    await _ping(self._master(self._client.get_node_from_key("")))
                else:
                    await _ping(self._client)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BackendError(f"Redis error: {exc}") from exc

    # The commands of the Connection protocol

    async def incr(self, key: str, ttl: int) -> int | None:
        # redis-py's `incr` sends INCRBY; the raw command keeps the protocol to a plain INCR.
        incr = self._enqueue(
            lambda pipe: pipe.execute_command("INCR", key), idempotent=False, key=key
        )
        expire = self._enqueue(lambda pipe: pipe.expire(key, ttl), key=key)
        await incr.done.wait()
        await expire.done.wait()
        if _holds_no_integer(incr.error):
            _reply(expire)
            return None  # the key holds a terminal state: the stream finished
        value = _reply(incr)
        _reply(expire)
        return int(value)

    async def get(self, key: str) -> str | None:
        return text(await self._call(lambda pipe: pipe.get(key), key=key))

    async def ttl(self, key: str) -> float | None:
        millis = int(await self._call(lambda pipe: pipe.pttl(key), key=key))
        if millis == -2:
            return None  # no such key
        return math.inf if millis < 0 else millis / 1000

    async def set(self, key: str, value: str, ttl: int) -> None:
        await self._call(lambda pipe: pipe.set(key, value, ex=ttl), key=key)

    async def swap(self, key: str, value: str, ttl: int) -> str | None:
        return text(
            await self._call(
                lambda pipe: pipe.set(key, value, ex=ttl, get=True), idempotent=False, key=key
            )
        )

    async def replace(self, key: str, expected: str, value: str, ttl: int) -> bool:
        answer = await self._call(
            lambda pipe: pipe.execute_command("EVAL", _REPLACE, 1, key, expected, value, ttl),
            idempotent=False,
            key=key,
        )
        return bool(answer)

    async def create(self, key: str, value: str, ttl: int) -> bool:
        created = await self._call(
            lambda pipe: pipe.set(key, value, ex=ttl, nx=True), idempotent=False, key=key
        )
        return bool(created)

    async def publish(self, channel: str, message: bytes) -> int:
        command = self._publish
        return int(
            await self._call(
                lambda pipe: pipe.execute_command(command, channel, message), key=channel
            )
        )

    def notify(self, channel: str, message: bytes) -> None:
        command = self._publish
        # Queued with the other commands; its answer (or error) is nobody's.
        self._enqueue(lambda pipe: pipe.execute_command(command, channel, message), key=channel)

    async def numsub(self, channel: str) -> int:
        command = "PUBSUB SHARDNUMSUB" if self._publish == "SPUBLISH" else "PUBSUB NUMSUB"
        answer = await self._call(lambda pipe: pipe.execute_command(command, channel), key=channel)
        # [name, count] flat (RESP2), a map (RESP3), or pairs redis-py made of them.
        if isinstance(answer, dict):
            return int(next(iter(answer.values()), 0))
        flat = [item for pair in answer for item in (pair if isinstance(pair, tuple) else [pair])]
        return int(flat[1]) if len(flat) > 1 else 0

    async def restart(
        self, sentinel: str, restarts: str, text: str, expected: str, ttl: int
    ) -> int | None:
        answer = await self._call(
            lambda pipe: pipe.execute_command(
                "EVAL", _RESTART, 3, sentinel, restarts, text, expected, ttl
            ),
            idempotent=False,
            key=sentinel,
        )
        return None if answer is None else int(answer)

    # Durable streams: a Redis Stream per stream, entry ids `<offset>-<seq>`.

    async def append(
        self,
        key: str,
        entries: Sequence[LogAppend],
        field: str,
        ttl: int,
        channel: str,
        sentinel: str,
        state: str | None = None,
    ) -> LogId | None:
        keys = [key, channel, sentinel]
        args: list[Any] = [field, ttl, self._publish, state or ""]
        for (at, seq), value, message in entries:
            args += (f"{at}-{seq}", value, message)
        last = text(
            await self._call(
                lambda pipe: pipe.execute_command("EVAL", _APPEND, len(keys), *keys, *args),
                key=key,
            )
        )
        if not last:
            return None
        last_offset, _, last_seq = last.partition("-")
        return int(last_offset), int(last_seq)

    async def read(self, key: str, offset: int, count: int) -> list[LogEntry]:
        # The entry that holds `offset` (the last one at or before it), then those after it:
        # two commands, one round trip.
        at = f"{offset}-1"
        before = self._enqueue(lambda pipe: pipe.xrevrange(key, at, "-", count=1), key=key)
        after = self._enqueue(lambda pipe: pipe.xrange(key, f"({at}", "+", count=count), key=key)
        await before.done.wait()
        await after.done.wait()
        entries = []
        for entry_id, fields in [*_reply(before), *_reply(after)][:count]:
            ms, _, seq = text(entry_id).partition("-")  # type: ignore[union-attr]
            [(field, value)] = fields.items()
            entries.append((int(ms), int(seq), text(field) or "", value))
        return entries

    async def delete(self, key: str) -> None:
        await self._call(lambda pipe: pipe.delete(key), key=key)


# Appends entries to a durable stream's log, each unless an entry at or after its id is there
# (so a retried append adds nothing), refreshes the TTL, sets the stream's state if one is given
# (else sets it running if a restart lost it), and publishes each entry's message: atomic, one
# round trip. Returns the id of the log's last entry before (empty if none). KEYS: log, channel,
# state key. ARGV: field, ttl, publish command, state or "", then id, value, message per entry.
# The channel is a KEY so that a cluster checks that it lives in the log's slot, as SPUBLISH in
# a script requires. Offsets stay below 2^53, exact in Lua's numbers.
_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local previous = ''
local lo, ls = -1, -1
if #last > 0 then
  previous = last[1][1]
  local o, s = string.match(previous, '(%d+)-(%d+)')
  lo, ls = tonumber(o), tonumber(s)
end
for i = 5, #ARGV, 3 do
  local o, s = string.match(ARGV[i], '(%d+)-(%d+)')
  local no, ns = tonumber(o), tonumber(s)
  if no > lo or (no == lo and ns > ls) then
    redis.call('XADD', KEYS[1], ARGV[i], ARGV[1], ARGV[i + 1])
    lo, ls = no, ns
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[2])
end
for i = 7, #ARGV, 3 do
  redis.call(ARGV[3], KEYS[2], ARGV[i])
end
return previous
"""


# Sets a key only if it still holds the value read (a compare-and-set). KEYS: the key. ARGV:
# expected value, new value, ttl.
_REPLACE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# Starts a stream again if its state is still the one read: the sentinel set running, one more
# restart counted, the stored text deleted; every key with the TTL. Returns the new attempt, or
# nothing if the state changed. KEYS: sentinel, restarts, text. ARGV: expected state, ttl.
_RESTART = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
local restarts = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return restarts + 1
"""


async def _ping(client: Redis | RedisCluster) -> None:
    # Through execute_command: `ping()` is typed `Awaitable[bool] | bool` in some redis-py
    # releases, which cannot be awaited under mypy strict.
    await client.execute_command("PING")
