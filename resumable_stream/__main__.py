"""The `resumable-stream` command (also `python -m resumable_stream`).

Subcommands:

- `demo`: serve a page where a simulated LLM streams answers that survive cut connections,
  reloads and extra viewers.
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
