"""`internvl mpo MODEL --data pairs_meta.json [...]`: mixed preference optimization on MMPR-style pairs.

Every fine-tuning flag applies (LoRA, freezing, batch sizes, checkpoints, --resume, torchrun); MPO adds
`--beta` and `--loss-weights`. All of them are also keys of the `--config` YAML file (configs/mpo/*.yaml).
"""

from __future__ import annotations

import argparse

# MPO's own defaults for fine-tuning options (the reference InternVL2.5-MPO recipe: lr 1e-6)
MPO_DEFAULTS = {"out": "runs/mpo", "lr": 1e-6}
MPO_KEYS = ("beta", "loss_weights")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.args import add_arguments as add

    add(p)
    for action in p._actions:  # the help of the options whose default MPO changes
        if action.dest in MPO_DEFAULTS and action.help:
            action.help = action.help.rsplit(" (default:", 1)[0] + f" (default: {MPO_DEFAULTS[action.dest]})"
    g = p.add_argument_group("mpo", "loss per micro-batch, as TRL's = w1 * mean DPO sigmoid + w2 * mean BCO pair "
                             "(running reward shift) + w3 * NLL (token mean over the chosen answers); reference "
                             "model: the starting policy, frozen")  # fmt: skip
    g.add_argument("--beta", type=float, default=argparse.SUPPRESS,
                   help="preference temperature of the DPO and BCO terms (default: 0.1)")  # fmt: skip
    g.add_argument("--loss-weights", default=argparse.SUPPRESS, metavar="W1,W2,W3",
                   help="weights of DPO sigmoid, BCO pair and NLL (default: 0.8,0.2,1.0)")  # fmt: skip


def from_namespace(ns: argparse.Namespace):
    """(TrainArgs, MPOArgs): MPO defaults <- the --config YAML file <- the flags given."""
    from dataclasses import fields

    from ..errors import TrainingError
    from ..mpo.losses import MPOArgs
    from ..train.args import GROUPS, TrainArgs, read_yaml

    values = dict(MPO_DEFAULTS)
    config = getattr(ns, "config", None)
    if config:
        values.update(read_yaml(config))
    known = {f.name for c in GROUPS.values() for f in fields(c)} | set(MPO_KEYS)
    values.update({k: v for k, v in vars(ns).items() if k in known})
    mpo = {k: values.pop(k) for k in MPO_KEYS if k in values}
    source = str(config) if config else "arguments"
    try:
        mpo_args = MPOArgs(**mpo)
    except TrainingError as e:
        raise TrainingError(f"{source}: {e}") from None
    return TrainArgs.from_dict(values, source=source), mpo_args


def run(args: argparse.Namespace) -> int:
    from ..mpo.objective import train_mpo

    train_args, mpo_args = from_namespace(args)
    result = train_mpo(train_args, mpo_args)
    return 130 if result.interrupted else 0
