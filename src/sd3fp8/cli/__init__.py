"""`sd3fp8` command line: a thin adapter that builds configuration and calls the engine.

One module per command group; each registers its subcommands. Heavy libraries (torch, diffusers)
are imported inside the commands, so `--help` and argument errors are fast.
"""

from __future__ import annotations

import logging
import sys

from sd3fp8.cli import calibration, files, generate, measure, serve
from sd3fp8.cli.common import _Parser
from sd3fp8.errors import SD3FP8Error

COMMAND_GROUPS = (generate, files, calibration, measure, serve)


def make_parser() -> _Parser:
    parser = _Parser(prog="sd3fp8", description="FP8 inference for Stable Diffusion 3.5")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def one_line(error: Exception) -> str:
    """The message as one printable line: names from hostile files may hold newlines or lone surrogates."""
    text = " ".join(str(error).split()).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 2000 else text[:2000] + " [...]"  # a hostile file's names can be megabytes


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from sd3fp8._env import quiet_environment

    quiet_environment()  # imports nothing: commands that load models quiet the libraries themselves (cli.common)
    try:
        return args.func(args)
    except SD3FP8Error as e:
        print(f"sd3fp8: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a read or write no command anticipated: still one line, naming the path and cause
        from sd3fp8.io.oserrors import file_error

        print(f"sd3fp8: error: {one_line(file_error(e, None, 'access'))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sd3fp8: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
