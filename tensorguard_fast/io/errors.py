"""What a command-line entry reports as a user's mistake (exit 2, one line) rather than a bug, shared by
`tensorguard-fast` (cli) and the torchrun entry `-m tensorguard_fast.backdoor`, so the two cannot drift apart."""
from __future__ import annotations


def user_errors() -> tuple:
    """Exceptions that mean a mistake in the input or the options: bad values (ModelLoadError is a ValueError),
    missing or unreadable files, a bundled model whose package is not installed."""
    from .bundled import BundledModelMissing

    return ValueError, OSError, BundledModelMissing


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its type's name when it has none)."""
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__
