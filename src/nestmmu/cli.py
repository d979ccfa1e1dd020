"""Placeholder for the ``nestmmu`` console entry point; to be replaced by the real CLI."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nestmmu", description="Nested POWER9 radix MMU model.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("serve", "run an L0, L1 or L2 service"),
        ("demo", "run a small scenario end to end"),
        ("audit", "check invariants I1-I7 across the services"),
        ("bench", "measure accesses per second"),
    ]:
        sub.add_parser(name, help=help_text)
    args = parser.parse_args(argv)
    print(f"nestmmu {args.command}: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
