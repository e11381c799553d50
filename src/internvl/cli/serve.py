"""`internvl serve [MODEL]`: an OpenAI-compatible HTTP server (chat completions, SSE streaming) and a chat page."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .chat import MODEL_HELP

    parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="branch, tag or commit of a Hub MODEL (default: main)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--model-name", default=None, help="the model id clients send (default: the folder name)"
    )
    parser.add_argument("--api-key", default=os.environ.get("INTERNVL_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $INTERNVL_API_KEY, or none)")  # fmt: skip
    parser.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                        help="allow image_url file paths under DIR (default: local files refused)")  # fmt: skip
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (size- and time-limited; default: refused)")  # fmt: skip
    parser.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    parser.add_argument(
        "--max-body-mb", type=float, default=32, help="request body limit in MiB (default 32)"
    )
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000,
                        help="largest image (width*height) decoded, a decompression-bomb cap (default 40M)")  # fmt: skip
    parser.add_argument("--max-tokens-cap", type=int, default=2048,
                        help="largest max_tokens a request may ask for, and the default (default 2048)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request (default 600)")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    parser.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting before 429 (default 256)"
    )
    parser.add_argument("--prefill-budget", type=int, default=512,
                        help="prompt tokens admitted per engine step, bounding decode stalls (default 512)")  # fmt: skip
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="cast the weights")
    parser.add_argument("--quantize", choices=("int8",), default=None, help="weight-only int8 language model")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, mps or auto: the GPU when there is one (default auto)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the engine (default: torch's choice, one per core)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..api import load, resolve_device
    from ..checkpoint.hub import is_hub_id
    from ..serve.app import ServeSettings, create_app
    from ..serve.media import MediaPolicy
    from ..serve.server import run as run_server
    from .chat import model_path

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # before a download or a load
    hub_id = args.model if args.model and is_hub_id(args.model) else None
    path = model_path(args)
    media_dir = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    if media_dir is not None and not media_dir.is_dir():
        print(
            f"internvl serve: error: --allowed-local-media-path {media_dir}: not a directory", file=sys.stderr
        )
        return 2
    body = int(args.max_body_mb * 2**20)
    settings = ServeSettings(
        model_name=args.model_name or hub_id or path.resolve().name, api_key=args.api_key or None,
        max_images=args.max_images, max_body_bytes=body, max_tokens_cap=args.max_tokens_cap,
        timeout=args.timeout, prefill_budget=args.prefill_budget, max_queue=args.max_queue,
        media=MediaPolicy(media_dir, args.allow_remote_images, max_bytes=body, max_pixels=args.max_image_pixels),
    )  # fmt: skip
    llm = load(path, device=device, dtype=args.dtype, quantize=args.quantize, max_batch=args.max_batch)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"internvl serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"internvl serve: {settings.model_name} at http://{args.host}:{args.port} "
          f"(chat page /, API /v1/chat/completions, docs /docs)", file=sys.stderr)  # fmt: skip
    run_server(create_app(llm, settings), args.host, args.port, args.log_level)
    return 0
