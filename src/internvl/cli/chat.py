"""`internvl chat [MODEL] -i IMG -v VIDEO -p "question"`: one answer, streamed; without -p an interactive session."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from ..options import add_config, add_options, option
from .options import GenerationOptions, ModelOptions, check_generation, cpu_tile_default, load_from_args

REPL_HELP = """commands:
  /image PATH     attach an image to the conversation (several allowed)
  /video PATH     attach a video
  /system TEXT    set the system message (empty: none)
  /clear          forget the conversation and the attachments
  /bye            quit (also Ctrl-D)"""


@dataclass
class ChatOptions:
    """The media and the question of a chat."""

    image: list[str] = option([], "image file (repeat for several)", short="-i", append=True)  # noqa: RUF009
    video: str | None = option(None, "video file", short="-v")
    prompt: str | None = option(None, "question; without it, an interactive session", short="-p")
    system: str | None = option(None, "system message (default: the template's)", short="-s")
    no_stream: bool = option(False, "print the answer at once")
    verbose: bool = option(False, "print which decode and prefill paths run (on a CPU) before answering")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ModelOptions)
    add_options(p, ChatOptions)
    add_options(p.add_argument_group("generation"), GenerationOptions)
    add_config(p, ModelOptions, ChatOptions, GenerationOptions)


def sampling_from_args(args: argparse.Namespace):
    """The generation flags as `SamplingParams`, checked before anything is loaded."""
    from ..engine.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..api import resolve_device
    from ..engine.prefill import console_progress
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
    line = getattr(model, "kernel_line", None)
    if line and (args.verbose or "no fast path" in line):  # never a silent slowdown: said in one line
        print(line, file=sys.stderr, flush=True)
    notice = cpu_tile_default(args, model)  # a first answer in seconds, not minutes; said once it is given
    model.engine.prefill_run.progress = console_progress(sys.stderr)  # long prefills show a line (terminal only)
    if args.prompt is not None:
        answer(model, args.prompt, images, video, [], args.system, args, sampling)
        if notice and images:
            print(notice, file=sys.stderr, flush=True)
        return 0
    if notice:
        print(notice, file=sys.stderr, flush=True)
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
