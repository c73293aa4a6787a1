"""The one base of twinserve's domain errors; the CLI's UsageError and its positive_int argument type.

Every error that reports bad input or an unserveable model (a recipe field, a checkpoint, an artifact file, a
flag, a request that cannot fit) derives from TwinserveError; the `twinserve` command line catches it once
and exits 2 with ``error: <message>`` on one line, never a traceback. It is a ValueError, as each of these
errors was before they shared a base, so ``except ValueError`` keeps catching them.
"""
from __future__ import annotations


class TwinserveError(ValueError):
    """Bad input or an unserveable model; the message names the field, file or flag (CLI: exit code 2)."""


class UsageError(TwinserveError):
    """A command-line argument that cannot be used (a wrong value, a missing flag, a flag combination)."""


def positive_int(v: str) -> int:
    """argparse type of the counts the commands take (ranks, threads, experts, layers): an integer >= 1."""
    import argparse
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n
