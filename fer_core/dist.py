"""Rank awareness: only rank 0 writes files, logs and shows progress (DDP via torchrun later)."""

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0
