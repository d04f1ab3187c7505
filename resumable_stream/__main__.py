"""The `resumable-stream` command (also `python -m resumable_stream`).

Subcommands:

- `demo`: serve a page where a simulated LLM streams answers that survive cut connections,
  reloads and extra viewers.
- `tail URL`: print the text of an event stream as it arrives, resuming after dropped
  connections, until the server says the stream is over (needs httpx).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return port


def _delay(text: str) -> float:
    try:
        delay = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(delay) and 0 <= delay <= 10):
        raise argparse.ArgumentTypeError(f"the delay is 0 to 10 seconds, got {text}")
    return delay


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import run

    redis_url = args.redis_url if args.redis_url is not None else os.environ.get("REDIS_URL")
    return run(args.host, args.port, redis_url or None, args.delay)


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"a header is 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _retries(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of attempts: {text!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"the number of retries is >= 0, got {count}")
    return count


def _run_tail(args: argparse.Namespace) -> int:
    try:
        import httpx
    except ImportError:
        print("resumable-stream tail needs httpx: pip install httpx", file=sys.stderr)
        return 2
    import anyio

    from .client import ResumableClientError

    try:
        anyio.run(_tail, args)
    except (ResumableClientError, httpx.HTTPError, httpx.InvalidURL) as exc:
        # An error of the stream or of the request (a bad URL, say), not of this program.
        print(f"resumable-stream tail: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


async def _tail(args: argparse.Namespace) -> None:
    from contextlib import aclosing

    from .client import follow

    stream = follow(
        args.url,
        headers=dict(args.header),
        last_event_id=args.last_event_id,
        max_retries=args.max_retries,
    )
    last = ""  # the last character printed
    async with aclosing(stream) as events:
        async for event in events:
            if event.event == "message" and event.data:
                sys.stdout.write(event.data)
                sys.stdout.flush()  # as it arrives, not when a buffer fills
                last = event.data[-1]
    if last not in ("", "\n") and sys.stdout.isatty():
        sys.stdout.write("\n")  # keep the prompt off the text; a pipe gets the text exactly


def build_parser() -> argparse.ArgumentParser:
    from ._demo import DEFAULT_DELAY

    parser = argparse.ArgumentParser(
        prog="resumable-stream",
        description="Streamed responses that survive dropped connections and serve extra viewers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="serve a page where a simulated LLM streams answers you can cut, reload and share",
        description=(
            "Serve a page where a simulated LLM streams an answer over Server-Sent Events. Cut "
            "the connection server side, reload the page or open a second tab: the answer "
            "always continues exactly where it was. Needs uvicorn: "
            "pip install 'resumable-streams[demo]'."
        ),
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    demo.add_argument(
        "--port", type=_port, default=8000, help="port to listen on, 0 for any (%(default)s)"
    )
    demo.add_argument(
        "--redis-url",
        metavar="URL",
        default=None,
        help="Redis to keep the streams in (default: $REDIS_URL, else an in-memory backend)",
    )
    demo.add_argument(
        "--delay",
        type=_delay,
        default=DEFAULT_DELAY,
        metavar="SECONDS",
        help="time between two tokens of the simulated model (%(default)s)",
    )
    demo.set_defaults(handler=_run_demo)
    tail = commands.add_parser(
        "tail",
        help="print the text of an event stream as it arrives, resuming after dropped connections",
        description=(
            "Print the data of the message events of the Server-Sent Events stream at URL as "
            "they arrive. A dropped connection is resumed with Last-Event-ID; the command ends "
            "(status 0) when the server answers 204, and fails (status 1) on an error."
        ),
    )
    tail.add_argument("url", metavar="URL", help="the stream's URL")
    tail.add_argument(
        "--header",
        "-H",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (repeatable), e.g. for authorization",
    )
    tail.add_argument(
        "--last-event-id", metavar="ID", default=None, help="resume after this event id"
    )
    tail.add_argument(
        "--max-retries",
        type=_retries,
        default=5,
        metavar="N",
        help="give up after N reconnections in a row that bring nothing (%(default)s)",
    )
    tail.set_defaults(handler=_run_tail)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already reported
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
