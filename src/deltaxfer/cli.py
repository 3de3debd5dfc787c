"""The ``deltaxfer`` command: argparse subcommands, one handler each."""
import argparse
import sys

from deltaxfer import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaxfer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deltaxfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
