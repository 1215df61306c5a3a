"""`tensorguard-fast scan`: flag the poisoned samples of a fine-tuning dataset and write the clean rest back."""
from __future__ import annotations

import argparse

from ..backdoor.command import DESCRIPTION, add_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("scan", help="score every sample of a fine-tuning set and write the clean set back",
                              description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
