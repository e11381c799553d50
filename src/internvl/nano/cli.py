"""The recipe's verbs, `internvl nano VERB` (or `python -m internvl.nano VERB`): prepare, curriculum, vit,
snapshot, ship, grow, probe; runs/train_nano.sh calls them in order. Errors are one line and exit code 1."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from ..errors import InternVLError
from ..options import add_options, option

DESCRIPTION = "the built-in nano model's recipe: tokenizer and config, curriculum, encoder pretraining, ship"
SPLIT_HELP = "a synthetic split folder (internvl synth --split train)"


@dataclass
class PrepareOptions:
    """`prepare`: tokenizer + config.json for training the nano model from scratch."""

    data: str | None = option(None, SPLIT_HELP, required=True)
    out: str | None = option(None, "folder to write", required=True)
    vocab_size: int = option(1024, "BPE vocabulary size")


@dataclass
class SnapshotOptions:
    """`snapshot`: a model folder from a training checkpoint (its tensors over INIT's)."""

    init: str | None = option(None, "the folder `prepare` wrote (or the run's start model)", required=True)
    checkpoint: str | None = option(None, "OUT/checkpoints/step-N", required=True)
    out: str | None = option(None, "model folder to write", required=True)
    max_dynamic_patch: int | None = option(None, "the tiling the weights were trained at")


@dataclass
class CurriculumOptions:
    """`curriculum`: the curriculum sets and stage meta files, next to a train split."""

    split: str | None = option(None, SPLIT_HELP, required=True)
    out: str | None = option(None, "folder for the three sets and the stage meta files", required=True)
    scale: float = option(1.0, "fraction of the default set sizes")


@dataclass
class VitOptions:
    """`vit`: pretrain the vision encoder on dense patch targets (nano/vit.py)."""

    init: str | None = option(None, "the folder `prepare` wrote", required=True)
    out: str | None = option(None, "model folder to write (checkpoints in OUT/checkpoints)", required=True)
    steps: int = option(1200, "optimizer steps")
    images: int = option(20000, "training images generated once, then cached (see --data)")
    batch: int = option(32, "images a step")
    lr: float = option(1e-3, "peak learning rate (warmup, then cosine to 0)")
    save_every: int = option(250, "checkpoint and model folder every N steps")
    data: str | None = option(None, "the image cache (default OUT/vit_data.npz)")
    resume: bool = option(False, "continue from the newest checkpoint in OUT")
    stop_after: int = option(0, "end at this step with a checkpoint, the schedule unchanged (0: the end)")
    probe_only: bool = option(False, "train the read-out alone on the random encoder (baseline)")
    max_num: int = option(1, "tiles per image: >1 trains on dynamic tiling's native-scale tiles and thumbnail")
    keep_weights: bool = option(False, "start from INIT's weights (a trained model) instead of a fresh encoder")
    balance_kind: bool = option(False, "add the kind loss over object patches alone (background dominates kind)")
    compile: bool = option(False, "torch.compile each vision layer (needs a C++ compiler; about a minute to build)")
    through_projector: bool = option(False, "train the projector too, reading the patch targets and each token's "
                                     "place from the image embeddings (needs --keep-weights)")  # fmt: skip
    hold: float = option(1.0, "with --through-projector: weight of the embeddings' change from the start")
    held_out: int = option(256, "images of the held-out set the summary reports on (a tiny run: fewer)")


@dataclass
class ShipOptions:
    """`ship`: copy a trained model into the package as the built-in model."""

    model: str | None = option(None, "a complete model folder (e.g. OUT/stage1/final) or a training checkpoint "
                               "(OUT/stage1/checkpoints/step-N)", positional="one")  # fmt: skip
    stage: str | None = option(None, "the recipe stage that made it (e.g. stage1)", required=True)
    summary: str | None = option(None, "internvl eval synthetic's summary.json of this model")
    hours: float | None = option(None, "training time on the machine, all stages")
    notes: str = option("", "a line on how it was trained and on which machine (default: none)")
    step: int | None = option(None, "the training step of MODEL (default: the newest checkpoint beside it)")
    dest: str | None = option(None, "target folder (default: the package's assets/nano)")
    base: str | None = option(None, "a checkpoint's start model, for the tensors it lacks (default: the one its "
                              "run recorded)")  # fmt: skip


@dataclass
class GrowOptions:
    """`grow`: a deeper decoder computing the same function (copies of layers, output projections zero)."""

    model: str | None = option(None, "a model folder in the original InternVL layout", positional="one")
    out: str | None = option(None, "model folder to write", required=True)
    after: str = option("2,4", "the decoder layers each followed by a copy of itself, e.g. '2,4'")


@dataclass
class ProbeOptions:
    """`probe`: does the model read its images? (loss with own vs swapped images)."""

    model: str | None = option(None, "a model folder", positional="one")
    data: str | None = option(None, "a fine-tuning meta.json (rows with one image are used)", required=True)
    n: int = option(64, "rows")


VERBS = {"prepare": PrepareOptions, "snapshot": SnapshotOptions, "curriculum": CurriculumOptions,
         "vit": VitOptions, "ship": ShipOptions, "grow": GrowOptions, "probe": ProbeOptions}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="nano_verb", metavar="VERB")
    parser.set_defaults(_nano_prog=parser.prog, _nano_help=parser.format_help)
    for verb, cls in VERBS.items():
        text = cls.__doc__.split(": ", 1)[1].rstrip(".")
        add_options(sub.add_parser(verb, help=text, description=text), cls)


def run(args: argparse.Namespace) -> int:
    """Run one verb; its errors (bad input, missing files, unwritable outputs) are one line on stderr."""
    verb = args.nano_verb
    if verb is None:
        print(args._nano_help(), file=sys.stderr)
        return 2
    try:
        code = _run(verb, args)
    except (InternVLError, OSError, ValueError) as e:
        print(f"{args._nano_prog} {verb}: error: {e}", file=sys.stderr)
        return 1
    return code


def _run(verb: str, args: argparse.Namespace) -> int:
    if verb == "prepare":
        from .prepare import prepare

        cfg = prepare(args.data, args.out, args.vocab_size)
        print(f"wrote {args.out}/config.json and the tokenizer (vocabulary {cfg.llm.vocab_size})")
    elif verb == "snapshot":
        from .ship import snapshot

        print(snapshot(args.init, args.checkpoint, args.out, args.max_dynamic_patch))
    elif verb == "curriculum":
        from .curriculum import curriculum

        print(json.dumps(curriculum(args.split, args.out, args.scale, progress=True)))
    elif verb == "vit":
        from .vit import pretrain

        result = pretrain(args.init, args.out, args.steps, args.images, args.batch, args.lr,
                          save_every=args.save_every, data=args.data, train_encoder=not args.probe_only,
                          progress=True, resume=args.resume, stop_after=args.stop_after, max_num=args.max_num,
                          keep_weights=args.keep_weights, balance_kind=args.balance_kind,
                          compile=args.compile, through_projector=args.through_projector,
                          hold=args.hold, held_out=args.held_out)  # fmt: skip
        print(json.dumps(result, indent=2))
        return 130 if result.get("interrupted") else 0
    elif verb == "ship":
        from .ship import ship

        print(ship(args.model, args.stage, args.summary, args.hours, args.dest, args.notes, args.step, args.base))
    elif verb == "grow":
        from .grow import grow

        print(json.dumps(grow(args.model, args.out, args.after)))
    else:
        from .probe import probe

        print(json.dumps(probe(args.model, args.data, args.n), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internvl.nano", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
