"""`internvl chat [MODEL] -i IMG -v VIDEO -p "question"`: one answer, streamed; without -p an interactive session."""

from __future__ import annotations

import argparse
import sys

REPL_HELP = """commands:
  /image PATH     attach an image to the conversation (several allowed)
  /video PATH     attach a video
  /system TEXT    set the system message (empty: none)
  /clear          forget the conversation and the attachments
  /bye            quit (also Ctrl-D)"""


MODEL_HELP = "model folder or Hugging Face Hub id, e.g. OpenGVLab/InternVL3-1B (default: the built-in nano model)"
MAX_TILES = 64  # tiles per image (--max-num): InternVL's evaluation gives all images of a question 64 together
MAX_FRAMES = 64  # video frames (--num-segments): 64 frames are 16k image tokens at 256 per frame


def add_model_arguments(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """Flags shared by the verbs that load a model."""
    if positional:
        p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--revision", default=None, metavar="REV",
                   help="branch, tag or commit of a Hub MODEL (default: main)")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto: the GPU when there is one "
                   "(default auto)")  # fmt: skip
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast weights (default: as stored)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 for the language model")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-num", type=int, default=None,
                   help=f"max tiles per image, 1-{MAX_TILES} (default: the model's)")  # fmt: skip
    g.add_argument("--num-segments", type=int, default=8,
                   help=f"frames sampled from a video, 1-{MAX_FRAMES} (default 8)")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("-i", "--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("-v", "--video", default=None, help="video file")
    p.add_argument("-p", "--prompt", default=None, help="question; without it, an interactive session")
    p.add_argument("-s", "--system", default=None, help="system message (default: the template's)")
    p.add_argument("--no-stream", action="store_true", help="print the answer at once")
    add_generation_arguments(p)


def sampling_from_args(args: argparse.Namespace):
    """The generation flags as `SamplingParams`, checked before anything is loaded."""
    from ..engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip


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


def load_from_args(args: argparse.Namespace):
    """The model of MODEL/--revision on --device (checked before anything is downloaded or read)."""
    from ..api import load, resolve_device

    device = resolve_device(args.device)
    return load(model_path(args), device=device, dtype=args.dtype, quantize=args.quantize)


def run(args: argparse.Namespace) -> int:
    from ..api import resolve_device
    from ..errors import PromptError
    from ..processing import check_media

    check_generation(args)
    sampling = sampling_from_args(args)
    if args.prompt is not None and not args.prompt.strip():
        raise PromptError("-p/--prompt is empty; give a question, or leave -p out for an interactive session")
    resolve_device(args.device)
    # check the media files' headers before loading the model, so a bad file fails fast with one line; they
    # are decoded once, by the model's inputs room
    images, video = list(args.image), args.video
    check_media(images, video)
    model = load_from_args(args)
    if args.prompt is not None:
        answer(model, args.prompt, images, video, [], args.system, args, sampling)
        return 0
    return repl(model, images, video, args, sampling)


def answer(model, question, images, video, history, system, args, sampling) -> str:
    kw = {"video": video, "history": history, "system_message": system, "max_num": args.max_num,
          "num_segments": args.num_segments, "sampling": sampling}  # fmt: skip
    if args.no_stream:
        text = model.chat(question, images, **kw)
        print(text, flush=True)
        return text
    parts = []
    for delta in model.stream_chat(question, images, **kw):
        parts.append(delta)
        print(delta, end="", flush=True)
    print(flush=True)
    return "".join(parts).strip()


def repl(model, images, video, args, sampling) -> int:
    from ..errors import InternVLError
    from ..processing import build_question, check_media

    history: list[tuple[str, str]] = []
    system = args.system
    print(f"internvl chat ({model.path or 'model'}): type a question, /help for commands, /bye to quit")
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        try:
            if line.startswith("/"):
                cmd, _, rest = line.partition(" ")
                rest = rest.strip()
                if cmd in ("/bye", "/exit", "/quit"):
                    return 0
                if cmd == "/help":
                    print(REPL_HELP)
                elif cmd == "/clear":
                    history, images, video = [], [], None
                    print("(conversation cleared)")
                elif cmd == "/system":
                    system = rest
                    print(f"(system message set{'' if rest else ' to none'})")
                elif cmd == "/image":
                    if history:
                        raise InternVLError("attach images before the first question (or /clear first)")
                    check_media([rest])
                    images.append(rest)
                    print(f"(image {len(images)} attached: {rest})")
                elif cmd == "/video":
                    if history:
                        raise InternVLError("attach a video before the first question (or /clear first)")
                    check_media(video=rest)
                    video = rest
                    print(f"(video attached: {rest})")
                else:
                    print(f"unknown command {cmd}; /help lists them")
                continue
            text = answer(model, line, images, video, history, system, args, sampling)
            asked = line if history else build_question(line, len(images), args.num_segments if video else 0)
            history.append((asked, text))
        except InternVLError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)")
