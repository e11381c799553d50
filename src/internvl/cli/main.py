"""Entry point of the `internvl` command: dispatches verbs, prints errors as one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import InternVLError
from ..options import apply_config

# verb name -> module under internvl.cli that defines add_arguments(parser) and run(args) -> int | None
# Verb modules keep heavy imports (torch, PIL, fastapi) inside run() so that `--help` stays fast.
VERBS: dict[str, str] = {
    "finetune": "finetune",
    "merge-lora": "merge_lora",
    "chat": "chat",
    "synth": "synth",
    "convert": "convert",
    "eval": "eval",
    "serve": "serve",
    "mpo": "mpo",
    "build-prefs": "build_prefs",
    "nano": "nano",
    "prm-data": "prm_data",
    "bon": "bon",
    "prm-bench": "prm_bench",
    "calibrate": "calibrate",
}

HELP: dict[str, str] = {
    "chat": "ask questions about images and videos (one-shot with -p, interactive otherwise)",
    "serve": "OpenAI-compatible HTTP server with a web chat page",
    "finetune": "supervised fine-tuning (full, partial, LoRA) on reference meta/JSONL data",
    "mpo": "mixed preference optimization on MMPR-style preference pairs",
    "eval": "evaluate on VLMEvalKit TSV files or the built-in synthetic benchmark",
    "convert": "convert a checkpoint between the original and the transformers (-hf) layouts",
    "merge-lora": "merge a LoRA adapter into its base model",
    "synth": "generate Synthetic Visual World data",
    "build-prefs": "build MPO preference pairs by sampling a model",
    "nano": "the built-in model's recipe: tokenizer and config, curriculum, encoder pretraining, ship",
    "prm-data": "step-labelled solutions from a synthetic split, to fine-tune a process reward model",
    "bon": "best-of-N answers picked by a process reward model, against greedy and majority vote",
    "prm-bench": "step-correctness F1 of a process reward model (VisualProcessBench's form)",
    "calibrate": "a visual keep schedule (G-Search / P-Sigmoid) and YOPO's head mask from validation rows",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internvl", description="InternVL multimodal models in plain PyTorch.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module_name in VERBS.items():
        module = importlib.import_module(f"internvl.cli.{module_name}")
        p = sub.add_parser(verb, help=HELP.get(verb, ""), description=HELP.get(verb, ""))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from .. import __version__

    return f"internvl {__version__}"


def os_error_line(e: OSError) -> str:
    """An OSError as one line naming the path(s): `PATH: Permission denied`, `SRC -> DST: File exists`."""
    if e.strerror and e.filename is not None:
        paths = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{paths}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        apply_config(args)  # a verb's --config YAML, under the flags given
        code = args._run(args)
    except InternVLError as e:
        print(f"internvl {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an output that cannot be written (read-only folder, a file in the way, disk full...)
        print(f"internvl {args.verb}: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"internvl {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
