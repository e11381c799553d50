"""`internvl finetune MODEL --data meta.json [...]`: supervised fine-tuning (full, partial or LoRA).

Every flag is also a key of the `--config` YAML file (configs/finetune/*.yaml). Under `torchrun
--nproc_per_node N` each process runs this verb and the model is sharded with FSDP2.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.args import add_arguments as add

    add(p)


def run(args: argparse.Namespace) -> int:
    from ..train.args import from_namespace
    from ..train.run import train

    result = train(from_namespace(args))
    return 130 if result.interrupted else 0
