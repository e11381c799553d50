"""The recipe's verbs, `internvl nano VERB` (or `python -m internvl.nano VERB`): prepare, curriculum, vit,
snapshot, ship, probe; runs/train_nano.sh calls them in order. Errors are one line and exit code 1."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InternVLError

DESCRIPTION = "the built-in nano model's recipe: tokenizer and config, curriculum, encoder pretraining, ship"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="nano_verb", metavar="VERB")
    parser.set_defaults(_nano_prog=parser.prog, _nano_help=parser.format_help)
    p = sub.add_parser("prepare", help="tokenizer + config.json for training the nano model from scratch")
    p.add_argument("--data", required=True, help="a synthetic split folder (internvl synth --split train)")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=1024)
    p = sub.add_parser("snapshot", help="a model folder from a training checkpoint of a from-scratch run")
    p.add_argument("--init", required=True, help="the folder `prepare` wrote")
    p.add_argument("--checkpoint", required=True, help="OUT/checkpoints/step-N")
    p.add_argument("--out", required=True)
    p.add_argument("--max-dynamic-patch", type=int, default=None,
                   help="the tiling the weights were trained at")
    p = sub.add_parser("curriculum", help="the curriculum sets and stage meta files, next to a train split")
    p.add_argument("--split", required=True, help="the train split folder (internvl synth --split train)")
    p.add_argument("--out", required=True, help="folder for the three sets and the stage meta files")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the default set sizes")
    p = sub.add_parser("vit", help="pretrain the vision encoder on dense patch targets (nano/vit.py)")
    p.add_argument("--init", required=True, help="the folder `prepare` wrote")
    p.add_argument("--out", required=True, help="model folder to write (checkpoints in OUT/checkpoints)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--images", type=int, default=20000,
                   help="training images generated once, then cached (see --data)")  # fmt: skip
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=250, help="checkpoint and model folder every N steps")
    p.add_argument("--data", default=None, help="the image cache (default OUT/vit_data.npz)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end at this step with a checkpoint (the schedule unchanged)")  # fmt: skip
    p.add_argument("--probe-only", action="store_true",
                   help="train the read-out alone on the random encoder (baseline)")  # fmt: skip
    p = sub.add_parser("ship", help="copy a trained model into the package as the built-in model")
    p.add_argument("model", help="a complete model folder (e.g. OUT/stage1/final)")
    p.add_argument("--stage", required=True, help="the recipe stage that made it (e.g. stage1)")
    p.add_argument("--summary", default=None, help="internvl eval synthetic's summary.json of this model")
    p.add_argument("--hours", type=float, default=None, help="training time on the machine, all stages")
    p.add_argument("--notes", default="", help="a line on how it was trained (and on which machine)")
    p.add_argument("--step", type=int, default=None,
                   help="the training step of MODEL (default: the newest checkpoint beside it)")  # fmt: skip
    p.add_argument("--dest", default=None, help="target folder (default: the package's assets/nano)")
    p = sub.add_parser("probe", help="does the model read its images? (loss with own vs swapped images)")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="a fine-tuning meta.json (rows with one image are used)")
    p.add_argument("--n", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    """Run one verb; its errors (bad input, missing files, unwritable outputs) are one line on stderr."""
    verb = args.nano_verb
    if verb is None:
        print(args._nano_help(), file=sys.stderr)
        return 2
    try:
        _run(verb, args)
    except (InternVLError, OSError, ValueError) as e:
        print(f"{args._nano_prog} {verb}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _run(verb: str, args: argparse.Namespace) -> None:
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
                          progress=True, resume=args.resume, stop_after=args.stop_after)  # fmt: skip
        print(json.dumps(result, indent=2))
    elif verb == "ship":
        from .ship import ship

        print(ship(args.model, args.stage, args.summary, args.hours, args.dest, args.notes, args.step))
    else:
        from .probe import probe

        print(json.dumps(probe(args.model, args.data, args.n), indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internvl.nano", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
