"""The Python API: `internvl.load(path)` returns a model you can `chat()` with about images and videos."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint.io import load_model
from .config import ModelConfig
from .efficiency import EfficiencyConfig
from .engine.detok import Detokenizer, TextEvent
from .engine.engine import Engine
from .engine.sampling import SamplingParams, sampling_params
from .errors import InternVLError
from .processing import InputBuilder, stop_strings
from .processing.harmony import is_harmony
from .tokenizer import Tokenizer

BUILTIN = Path(__file__).parent / "assets" / "nano"


def default_model_path() -> Path:
    if not (BUILTIN / "config.json").exists():
        raise InternVLError(f"the built-in model is not installed ({BUILTIN}); pass a model folder or a Hugging "
                            f"Face Hub id such as OpenGVLab/InternVL3-1B")  # fmt: skip
    return BUILTIN


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" (the GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps, checked against this machine."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise InternVLError(f"unknown device {name!r}: use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InternVLError(f"device {name!r}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                                f"use cpu or auto")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InternVLError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InternVLError(f"device {name!r}: MPS is not available on this machine; use cpu or auto")
    return dev


class InternVL:
    """A loaded model with its tokenizer, image processor, template and generation engine."""

    def __init__(self, model, tokenizer: Tokenizer, path: str | Path | None = None, max_batch: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.path = Path(path) if path else None
        self.kernel_line: str | None = None  # set by load() on a CPU: the decode kernels in use
        self.inputs = InputBuilder.from_config(self.config, tokenizer)
        if self.config.flash_mode:  # InternVL3.5-Flash: the prompt gives each tile the tokens the router picks
            self.inputs.tile_tokens = model.tile_tokens
        self.processor, self.template = self.inputs.processor, self.inputs.template
        stop_ids = [tokenizer.token_to_id(s) for s in stop_strings(self.template)]
        stop_ids.append(tokenizer.eos_id)
        self.stop_token_ids = sorted({i for i in stop_ids if i is not None})
        self.engine = Engine(model, max_batch=max_batch, stop_token_ids=self.stop_token_ids)  # token ids
        # the same engine with text and stop strings; GPT-OSS: the text is the harmony final channel's
        self.detok = Detokenizer(self.engine, tokenizer, harmony=is_harmony(self.template))
        self.defaults = SamplingParams(max_new_tokens=1024)
        self.efficiency: EfficiencyConfig | None = None

    def use_efficiency(self, cfg: EfficiencyConfig | str | None) -> None:
        """Set the visual-efficiency switches (None: all off): the inputs room tiles and budgets, the decoder
        prunes (model/prune.py), and the engine decodes with the step that the pruned caches need."""
        from .engine.accelerate import decode_step
        from .model.prune import install

        cfg = EfficiencyConfig.coerce(cfg)
        if cfg is not None:
            cfg.check_model(self.config.llm.num_hidden_layers)
        install(self.model, cfg)
        self.efficiency = cfg
        self.inputs.use_efficiency(cfg)
        self.processor = self.inputs.processor
        self.engine.decode_step = decode_step(self.model)

    # ---- preparing inputs -----------------------------------------------------------------------

    def prepare(self, question: str, images: Sequence[Any] | Any = None, video: Any = None,
                history: Sequence[tuple[str, str]] | None = None, system_message: str | None = None,
                max_num: int | Sequence[int | None] | None = None,
                num_segments: int = 8) -> tuple[list[int], torch.Tensor | None, str]:  # fmt: skip
        """Prompt ids, pixel values [tiles, 3, S, S] in the model's dtype (None without media) and the question
        as written into the prompt (for the history): `InputBuilder` (processing/inputs.py) builds them.

        `max_num` caps the tiles of every image, or of each image when it is a list (one entry per image;
        None: the model's max_dynamic_patch)."""
        inputs = self.inputs(question, images, video=video, history=history, system_message=system_message,
                             max_num=max_num, num_segments=num_segments, dtype=self.model.dtype)  # fmt: skip
        return inputs.input_ids, inputs.pixel_values, inputs.question

    def sampling(self, sampling: SamplingParams | None = None, **options: Any) -> SamplingParams:
        """A request's generation options, typed once: `sampling` (default: the model's `defaults`) with the
        keyword options that are not None applied (`engine.sampling.sampling_params`)."""
        return sampling_params(sampling or self.defaults, **options)

    # ---- chat -----------------------------------------------------------------------------------

    def chat(self, question: str, images: Sequence[Any] | Any = None, *, video: Any = None,
             history: list[tuple[str, str]] | None = None, system_message: str | None = None,
             max_num: int | None = None, num_segments: int = 8, return_history: bool = False,
             sampling: SamplingParams | None = None, **generation: Any):  # fmt: skip
        """Answer one question. With `return_history`, also the history extended by this turn. Generation
        options: `sampling`, and/or keywords (max_new_tokens=..., temperature=...) applied over it."""
        ids, pv, asked = self.prepare(question, images, video, history, system_message, max_num, num_segments)
        answer = self.detok.generate([(ids, self.sampling(sampling, **generation), pv)])[0].text.strip()
        if return_history:
            return answer, list(history or []) + [(asked, answer)]
        return answer

    def stream_chat(self, question: str, images: Sequence[Any] | Any = None, *, video: Any = None,
                    history: list[tuple[str, str]] | None = None, system_message: str | None = None,
                    max_num: int | None = None, num_segments: int = 8, sampling: SamplingParams | None = None,
                    **generation: Any) -> Iterator[str]:  # fmt: skip
        """Yield the answer as text deltas while it is generated."""
        ids, pv, _ = self.prepare(question, images, video, history, system_message, max_num, num_segments)
        started = False
        for event in self.detok.stream(ids, self.sampling(sampling, **generation), pv):
            text = event.text
            if not started:
                text = text.lstrip()
                started = bool(text)
            if text:
                yield text

    def batch_chat(self, questions: Sequence[str], images: Sequence[Any] | None = None, *,
                   system_message: str | None = None, max_num: int | None = None,
                   sampling: SamplingParams | None = None, **generation: Any) -> list[str]:  # fmt: skip
        """Answer several independent questions in one batch; `images[i]` is None, one image or a list."""
        images = list(images) if images is not None else [None] * len(questions)
        if len(images) != len(questions):
            raise InternVLError(f"batch_chat: {len(questions)} questions but {len(images)} image entries")
        params = self.sampling(sampling, **generation)
        requests = []
        for q, im in zip(questions, images):
            ids, pv, _ = self.prepare(q, im, None, None, system_message, max_num)
            requests.append((ids, params, pv))
        return [c.text.strip() for c in self.detok.generate(requests)]

    def samples(self, question: str, images: Sequence[Any] | Any = None, *, n: int = 8, seed: int = 0,
                system_message: str | None = None, max_num: int | None = None,
                sampling: SamplingParams | None = None, **generation: Any) -> list[str]:  # fmt: skip
        """`n` answers to one question in one batch, sampled with the seeds seed, seed + 1, ... (best-of-N:
        `internvl.prm.best_of`). Generation options as `chat`; give a temperature, or all n are the greedy one."""
        ids, pv, _ = self.prepare(question, images, None, None, system_message, max_num)
        params = self.sampling(sampling, **generation)
        requests = [(ids, replace(params, seed=seed + k), pv) for k in range(n)]
        return [c.text.strip() for c in self.detok.generate(requests)]

    def generate_ids(self, prompt_ids: list[int], pixel_values: torch.Tensor | None = None,
                     sampling: SamplingParams | None = None, **generation: Any) -> list[int]:  # fmt: skip
        """Token ids in, new token ids out (the stop token excluded)."""
        done = self.detok.generate([(prompt_ids, self.sampling(sampling, **generation), pixel_values)])[0]
        return done.seq.output_ids  # (through the text: a stop string ends the ids too)

    def events(self, prompt_ids: list[int], pixel_values: torch.Tensor | None = None,
               sampling: SamplingParams | None = None, **generation: Any) -> Iterator[TextEvent]:  # fmt: skip
        return self.detok.stream(prompt_ids, self.sampling(sampling, **generation), pixel_values)


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         quantize: str | None = None, max_batch: int = 16, optimize: bool = True,
         revision: str | None = None, v2pe: int | None = None, vir: int | None = None,
         efficiency: EfficiencyConfig | str | None = None, prefill_dtype: str | None = None) -> InternVL:  # fmt: skip
    """Load a checkpoint folder (original or -hf layout) or a LoRA adapter folder (merged into the base model it
    records), or a Hugging Face Hub id such as "OpenGVLab/InternVL3-1B" (downloaded into the Hub cache, at
    `revision`; see checkpoint/hub.py); no path loads the built-in nano model.

    `dtype`: None keeps the stored dtype; "bf16", "fp16" or "fp32" casts. `quantize="int8"` (or "int4",
    llama.cpp's Q4_0 groups) applies weight-only quantization to the language model's linear layers (for fast CPU
    decoding); on a CPU `kernel_line` says which decode kernels run (also logged to the "internvl" logger).
    `optimize` fuses the decoder's projections and uses the CPU decode kernels: the model is then for inference
    only (pass False to fine-tune or save it). `v2pe`: a stride turns on V2PE positions (`rope_pos_id_version` v2pe_fix;
    an image token advances stride / tokens per tile (256) positions, model/v2pe.py), as for OpenGVLab/V2PE.
    `vir` (InternVL3.5-Flash): 256 or 64 gives every tile that many tokens instead of the router's choice.
    `efficiency`: the visual-efficiency switches, an `EfficiencyConfig` or its spec ("fastv=2:0.5,pyramid");
    None is the plain model (efficiency.py). `prefill_dtype` (auto, bf16, fp32; default $INTERNVL_PREFILL_DTYPE,
    else auto): what a CPU computes the vision encoder and the prompt in; auto is fp32 for a bf16 model on a CPU
    without native bf16 matmuls (engine/prefill.py), said in `kernel_line`.
    """
    from .checkpoint.hub import resolve_model
    from .engine.prefill import choose

    device = resolve_device(device)
    efficiency = EfficiencyConfig.coerce(efficiency)  # a bad spec fails before anything is read
    choose(torch.float32, device, prefill_dtype)  # so does a bad prefill dtype
    if path is None and revision is not None:
        raise InternVLError("a revision needs a Hugging Face Hub model id")
    path = resolve_model(path, revision) if path is not None else default_model_path()
    if (path / "adapter_config.json").is_file():  # a LoRA adapter folder: its base with the adapter merged
        from .checkpoint.adapter import load_adapter_model

        model, tokenizer, _ = load_adapter_model(path, dtype=dtype, device=device)
    else:
        tokenizer = Tokenizer.from_dir(path)
        model, _ = load_model(path, dtype=dtype, device=device, image_token_id=tokenizer.image_context_id)
    if v2pe is not None:
        model.config = model.config.replace(rope_pos_id_version="v2pe_fix", rope_pos_id_stride=v2pe)
    if vir is not None:
        if not model.config.flash_mode or vir not in (256, 64):
            raise InternVLError("vir: 256 or 64, for an InternVL3.5-Flash checkpoint (flash_mode in config.json)")
        model.vir = vir
    if quantize is not None:
        from .engine.accelerate import quantize_model

        quantize_model(model, quantize)
    elif optimize:
        from .engine.accelerate import use_decode_kernels

        use_decode_kernels(model)
    llm = InternVL(model, tokenizer, path, max_batch=max_batch)
    if device.type == "cpu" and (quantize is not None or optimize):
        from .engine.accelerate import kernel_report

        llm.kernel_line = kernel_report(model)  # which decode path runs; `internvl chat --verbose` prints it
    if device.type == "cpu":
        llm.engine.prefill_run.dtype, why = choose(model.dtype, device, prefill_dtype)
        llm.kernel_line = f"{llm.kernel_line}; prefill: {why}" if llm.kernel_line else f"prefill: {why}"
        logging.getLogger("internvl").info(llm.kernel_line)
    if efficiency is not None:
        llm.use_efficiency(efficiency)
    return llm
