"""`internvl serve [MODEL]`: an OpenAI-compatible HTTP server (chat completions, SSE streaming) and a chat page."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from ..options import add_config, add_options, option
from .options import ModelOptions


@dataclass
class ServeOptions:
    """The HTTP server: address, access, limits and the engine's batch."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port")
    model_name: str | None = option(None, "the model id clients send (default: the folder name)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $INTERNVL_API_KEY, "
                                 "or none)")  # fmt: skip
    allowed_local_media_path: str | None = option(
        None, "allow image_url file paths under DIR (default: local files refused)", metavar="DIR"
    )
    allow_remote_images: bool = option(False, "fetch http(s) image URLs (size- and time-limited; default: refused)")
    max_images: int = option(8, "images per request")
    max_body_mb: float = option(32.0, "request body limit in MiB")
    max_image_pixels: int = option(40_000_000, "largest image (width*height) decoded, a decompression-bomb cap "
                                   "(default 40M)")  # fmt: skip
    max_tokens_cap: int = option(2048, "largest max_tokens a request may ask for, and the default")
    timeout: float = option(600.0, "seconds per request")
    max_batch: int = option(16, "requests decoded together")
    max_queue: int = option(256, "requests waiting before 429")
    prefill_budget: int = option(512, "prompt tokens admitted per engine step, bounding decode stalls")
    threads: int | None = option(None, "torch CPU threads for the engine (default: torch's choice, one per core)")
    log_level: str = option("info", "uvicorn's log level", choices=("debug", "info", "warning", "error"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ModelOptions)
    add_options(parser, ServeOptions, defaults={"api_key": os.environ.get("INTERNVL_API_KEY")})
    add_config(parser, ModelOptions, ServeOptions)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..api import load, resolve_device
    from ..checkpoint.hub import is_hub_id
    from ..serve.app import ServeSettings, create_app
    from ..serve.media import MediaPolicy
    from ..serve.server import run as run_server
    from .options import model_path

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
    llm = load(path, device=device, dtype=args.dtype, quantize=args.quantize, max_batch=args.max_batch,
               v2pe=args.v2pe, vir=getattr(args, "vir", None), efficiency=args.efficiency)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"internvl serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"internvl serve: {settings.model_name} at http://{args.host}:{args.port} "
          f"(chat page /, API /v1/chat/completions, docs /docs)", file=sys.stderr)  # fmt: skip
    run_server(create_app(llm, settings), args.host, args.port, args.log_level)
    return 0
