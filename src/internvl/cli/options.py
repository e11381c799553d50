"""The options every verb that loads a model shares: which model on what device (`ModelOptions`) and how
answers are generated (`GenerationOptions`), with the checks and the loading that follow from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..options import option

MODEL_HELP = "model folder or Hugging Face Hub id, e.g. OpenGVLab/InternVL3-1B (default: the built-in nano model)"
MAX_TILES = 64  # tiles per image (--max-num): InternVL's evaluation gives all images of a question 64 together
MAX_FRAMES = 64  # video frames (--num-segments): 64 frames are 16k image tokens at 256 per frame
# tiles per image on a CPU when --max-num is left out (README: Running on a CPU): the InternVL3-1B shape spends
# seconds per tile there, so its own 12 (+ thumbnail) would take minutes to a first answer, 4 (+ thumbnail) a third
CPU_MAX_NUM = 4


@dataclass
class ModelOptions:
    """Which model, on what device, in what precision."""

    model: str | None = option(None, MODEL_HELP, positional=True, metavar="MODEL")
    revision: str | None = option(None, "branch, tag or commit of a Hub MODEL (default: main)", metavar="REV")
    device: str = option("auto", "cpu, cuda, cuda:N, mps or auto: the GPU when there is one (default auto)")
    dtype: str | None = option(None, "cast weights (default: as stored)", choices=("fp32", "bf16", "fp16"))
    quantize: str | None = option(None, "weight-only int8, or int4 (llama.cpp's Q4_0 groups), for the language model",
                                  choices=("int8", "int4"))  # fmt: skip
    v2pe: int | None = option(None, "V2PE positions: image tokens advance STRIDE / 256 each (OpenGVLab/V2PE: 64)",
                              metavar="STRIDE")  # fmt: skip
    vir: int | None = option(None, "InternVL3.5-Flash: every tile gives 256 or 64 tokens (default: the router picks)",
                             choices=(256, 64))  # fmt: skip
    efficiency: str | None = option(None, "visual-efficiency switches, e.g. fastv=2:0.5,pyramid,max_visual_tokens="
                                    "1024 (README: Seeing with fewer tokens; default: off)", metavar="SPEC")  # fmt: skip


@dataclass
class GenerationOptions:
    """How answers are sampled, and how many tiles and frames the media of a question become."""

    max_new_tokens: int = option(1024, "tokens generated at most")
    temperature: float = option(0.0, "0 = greedy (default)")
    top_p: float = option(1.0, "sample from the smallest set of tokens with this total probability")
    top_k: int = option(0, "sample from the k likeliest tokens (0: all)")
    repetition_penalty: float = option(1.0, "divide the logits of tokens already seen by this; 1 is off")
    seed: int | None = option(None, "sampling seed (default: a fresh one)")
    max_num: int | None = option(None, f"max tiles per image, 1-{MAX_TILES} (default: the model's)")
    num_segments: int = option(8, f"frames sampled from a video, 1-{MAX_FRAMES} (default 8)")


def check_range(flag: str, value: int | None, low: int, high: int | None = None) -> None:
    """A one-line error for an integer flag outside [low, high] (None: no upper bound); None passes."""
    from ..errors import InternVLError

    if value is not None and (value < low or (high is not None and value > high)):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InternVLError(f"{flag} must be {span}, got {value}")


def check_generation(args: argparse.Namespace) -> None:
    check_range("--max-new-tokens", args.max_new_tokens, 1)
    check_range("--max-num", args.max_num, 1, MAX_TILES)
    check_range("--num-segments", args.num_segments, 1, MAX_FRAMES)


def cpu_tile_default(args: argparse.Namespace, model) -> str | None:
    """--max-num left out on a CPU: at most CPU_MAX_NUM tiles per image (set in args.max_num) when the model's own
    default is more; the one-line notice to print, None when the model's default stands (GPU, or few tiles)."""
    own = model.config.processor.max_dynamic_patch
    if args.max_num is not None or model.model.device.type != "cpu" or own <= CPU_MAX_NUM:
        return None
    args.max_num = CPU_MAX_NUM
    return (f"cpu: up to {CPU_MAX_NUM} tiles per image (the model's default is {own}, minutes per answer on a CPU); "
            f"--max-num {own} for finer detail")


def model_path(args: argparse.Namespace):
    """The local folder of MODEL: the built-in model, a folder, or a Hub id's snapshot (downloaded if needed)."""
    from ..api import default_model_path
    from ..checkpoint.hub import resolve_model
    from ..errors import InternVLError

    if args.model is None:
        if args.revision is not None:
            raise InternVLError("--revision needs a Hub MODEL id")
        return default_model_path()
    return resolve_model(args.model, args.revision)


def load_from_args(args: argparse.Namespace, **kwargs):
    """The model of MODEL/--revision on --device (checked before anything is downloaded or read)."""
    from ..api import load, resolve_device

    device = resolve_device(args.device)
    return load(model_path(args), device=device, dtype=args.dtype, quantize=args.quantize, v2pe=args.v2pe,
                vir=getattr(args, "vir", None), efficiency=getattr(args, "efficiency", None),
                **kwargs)  # fmt: skip
