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


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by the verbs that load a model."""
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the built-in nano model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
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
    g.add_argument("--max-num", type=int, default=None, help="max tiles per image (default: the model's)")
    g.add_argument("--num-segments", type=int, default=8, help="frames sampled from a video (default 8)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("-i", "--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("-v", "--video", default=None, help="video file")
    p.add_argument("-p", "--prompt", default=None, help="question; without it, an interactive session")
    p.add_argument("-s", "--system", default=None, help="system message (default: the template's)")
    p.add_argument("--no-stream", action="store_true", help="print the answer at once")
    add_generation_arguments(p)


def generation_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip


def load_from_args(args: argparse.Namespace):
    from ..api import load

    return load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)


def run(args: argparse.Namespace) -> int:
    from ..processing import load_image, load_video

    # read the media before the model: a bad file fails fast with one line
    images = [load_image(path) for path in args.image]
    video = args.video
    if video is not None:
        load_video(video, num_segments=1)
    model = load_from_args(args)
    gen = generation_kwargs(args)
    if args.prompt is not None:
        answer(model, args.prompt, images, video, [], args.system, args, gen)
        return 0
    return repl(model, images, video, args, gen)


def answer(model, question, images, video, history, system, args, gen) -> str:
    kw = dict(video=video, history=history, system_message=system, max_num=args.max_num,
              num_segments=args.num_segments, **gen)  # fmt: skip
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


def repl(model, images, video, args, gen) -> int:
    from ..errors import InternVLError
    from ..processing import build_question, load_image

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
                    images.append(load_image(rest))
                    print(f"(image {len(images)} attached: {rest})")
                elif cmd == "/video":
                    if history:
                        raise InternVLError("attach a video before the first question (or /clear first)")
                    video = rest
                    print(f"(video attached: {rest})")
                else:
                    print(f"unknown command {cmd}; /help lists them")
                continue
            text = answer(model, line, images, video, history, system, args, gen)
            asked = line if history else build_question(line, len(images), args.num_segments if video else 0)
            history.append((asked, text))
        except InternVLError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)")
