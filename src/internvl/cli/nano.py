"""`internvl nano VERB`: the built-in model's recipe (prepare, curriculum, vit, snapshot, ship, probe)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..nano.cli import add_arguments as add

    add(p)


def run(args: argparse.Namespace) -> int:
    from ..nano.cli import run as run_nano

    return run_nano(args)
