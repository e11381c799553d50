"""Arguments of a training run: small dataclasses whose fields are both the CLI flags and the YAML keys.

A field `max_seq_length` is the flag `--max-seq-length` and the key `max_seq_length:` of a `--config` file;
flags override the file, which overrides the defaults. Every value is checked in `__post_init__`, so a bad
option fails before anything is loaded, with one line that names it.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import TEMPLATES
from ..errors import TrainingError
from ..options import add_options, coerce, values_of
from ..options import option as _f
from ..options import read_yaml as _read_yaml


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TrainingError(message)


@dataclass
class ModelArgs:
    """What to train and where the result goes."""

    model: str | None = _f(None, "checkpoint folder (either layout) or Hugging Face Hub id to fine-tune",
                           positional=True)  # fmt: skip
    revision: str | None = _f(None, "branch, tag or commit of a Hub MODEL (default: main)", metavar="REV")
    init_from_config: str | None = _f(
        None, "train from random weights with this config.json (needs --tokenizer)", metavar="CONFIG.json"
    )
    tokenizer: str | None = _f(None, "tokenizer folder (default: the model folder)", metavar="DIR")
    template: str | None = _f(None, "chat template (default: the model's)", choices=tuple(TEMPLATES))
    system_message: str | None = _f(
        None, "system prompt for rows without a system turn (default: the model's)", metavar="TEXT"
    )
    out: str = _f("runs/finetune", "output folder: checkpoints, metrics, final model", metavar="DIR")
    save_layout: str = _f("original", "layout of the saved model", choices=("original", "hf"))
    save_dtype: str | None = _f(None, "dtype of the saved weights (default: the base checkpoint's)",
                                choices=("fp32", "bf16", "fp16"))  # fmt: skip
    save_merged: bool = _f(False, "LoRA: also write the merged model to OUT/merged")

    def __post_init__(self) -> None:
        _check(self.model is not None or self.init_from_config is not None,
               "give a MODEL folder to fine-tune, or --init-from-config CONFIG.json with --tokenizer DIR")  # fmt: skip
        _check(self.model is None or self.init_from_config is None,
               "give either MODEL or --init-from-config, not both")  # fmt: skip
        _check(self.init_from_config is None or self.tokenizer is not None,
               "--init-from-config needs --tokenizer DIR")  # fmt: skip


@dataclass
class DataArgs:
    """Training data and how samples are built."""

    data: str | None = _f(
        None, "meta JSON {name: {root, annotation, data_augment, repeat_time, length}}", metavar="META.json"
    )
    max_seq_length: int = _f(8192, "tokens per sample; longer conversations are cut")
    max_dynamic_patch: int | None = _f(None, "tiles per image (default: the model's)")
    min_num_frame: int = _f(8, "fewest frames sampled from a video")
    max_num_frame: int = _f(32, "most frames sampled from a video")
    packing: bool = _f(False, "pack several samples into one sequence (needs --max-steps)")
    max_packed_tokens: int = _f(16384, "token budget of a packed sequence")
    max_packed_images: int = _f(48, "tile budget of a packed sequence")
    loss_reduction: str = _f("square", "per-sample weight of the loss: 1 (token), 1/n (sample), 1/sqrt(n) (square)",
                             choices=("token", "sample", "square"))  # fmt: skip
    binding_loss: float = _f(0.0, "weight of the binding loss: attention from words naming objects of synthetic "
                             "scenes (meta.objects) to their image tokens (0: off)")  # fmt: skip
    binding_heads: str = _f("1:0,2:0", "layer:head pairs the binding loss supervises from the words naming objects",
                            metavar="L:H,...")  # fmt: skip
    binding_answer_heads: str = _f("", "layer:head pairs it supervises from the position that predicts the answer "
                                   "(onto every object the question names; empty: none)", metavar="L:H,...")  # fmt: skip
    binding_hop_heads: str = _f("", "layer:head pairs it supervises from the position that predicts the answer "
                                "onto the question's words naming objects (empty: none)", metavar="L:H,...")  # fmt: skip
    binding_first_heads: str = _f("", "layer:head pairs it supervises from the position that predicts the answer "
                                  "onto the question's first mention only (empty: none)", metavar="L:H,...")  # fmt: skip
    binding_last_heads: str = _f("", "layer:head pairs it supervises from the position that predicts the answer "
                                 "onto the question's last mention only (empty: none)", metavar="L:H,...")  # fmt: skip
    binding_count_heads: str = _f("", "layer:head pairs it supervises from the answer position of count questions, "
                                  "spread evenly over one token per named object and <img> (empty: none)",
                                  metavar="L:H,...")  # fmt: skip
    binding_count_sinks: str = _f("", "weight of <img> against one object in each count head's spread, one per "
                                  "--binding-count-heads pair (its share is m/(n+m); empty: 1 each)",
                                  metavar="M,...")  # fmt: skip
    binding_count_weight: float = _f(1.0, "multiplier of the binding loss and the place loss on count questions' "
                                     "rows (the count heads' spread and the count readouts; 1: as any other row)")
    binding_place_first_heads: str = _f("", "layer:head pairs it supervises from the position that predicts the "
                                        "answer onto the thumbnail's tokens showing the question's first-named "
                                        "objects (where on the image they are; empty: none)",
                                        metavar="L:H,...")  # fmt: skip
    binding_place_last_heads: str = _f("", "the same onto its last-named objects (empty: none)",
                                       metavar="L:H,...")  # fmt: skip
    binding_letter_heads: str = _f("", "layer:head pairs it supervises from each option's last token of a "
                                   "multiple-choice question onto the option's letter (empty: none)",
                                   metavar="L:H,...")  # fmt: skip
    binding_option_heads: str = _f("", "layer:head pairs it supervises from the answer position of a "
                                   "multiple-choice question onto the right option's last token (empty: none)",
                                   metavar="L:H,...")  # fmt: skip
    binding_choice_heads: str = _f("", "layer:head pairs it supervises from each option's last token of a "
                                   "multiple-choice question onto the question's words naming objects (empty: none)",
                                   metavar="L:H,...")  # fmt: skip
    binding_color_heads: str = _f("", "layer:head pairs it supervises from each mention's last token onto its color "
                                  "word, when it has one (\"yellow circles\"; empty: none)", metavar="L:H,...")  # fmt: skip
    binding_place_xy_loss: float = _f(0.0, "weight of the place loss: the answer position's MLP input at layer "
                                      "--binding-place-xy-layer, read on fixed directions, gives the centres of the "
                                      "question's first- and last-named objects (0: off)")  # fmt: skip
    binding_place_xy_layer: int = _f(-1, "the layer whose MLP input the place loss reads (with --binding-place-xy-loss)")
    binding_place_xy_word_layer: int = _f(-1, "the layer whose MLP input it reads at each mention too, for the centre "
                                           "of the objects the mention names (-1: not at the mentions)")  # fmt: skip
    binding_count_xy_layer: int = _f(-1, "the layer whose MLP input it reads at each count question's answer "
                                     "position too, for the count on a fifth direction (-1: not at count answers)")
    binding_count_word_heads: str = _f("", "layer:head pairs it supervises from a count question's mention (the word "
                                       "naming what to count), spread as --binding-count-heads are (empty: none)",
                                       metavar="L:H,...")  # fmt: skip
    binding_count_word_sinks: str = _f("", "weight of <img> against one object in each --binding-count-word-heads "
                                       "pair's spread (empty: 1 each)", metavar="M,...")  # fmt: skip
    binding_count_xy_word_layer: int = _f(-1, "the layer whose MLP input it reads at each count question's mention "
                                          "too, for the count on the fifth direction (-1: not at count mentions)")
    binding_match_xy_layer: int = _f(-1, "the layer whose MLP input it reads at each option's last token of a "
                                     "multiple-choice question too, for +1 (the right option) or -1 on a sixth "
                                     "direction (-1: not at options)")  # fmt: skip
    binding_letter_xy_layer: int = _f(-1, "the layer whose MLP input it reads at each multiple-choice answer position "
                                      "too, for the right letter's code (A 1,1; B 1,-1; C -1,1; D -1,-1) on a seventh "
                                      "and an eighth direction (-1: not at those answers)")  # fmt: skip
    binding_option_letter_xy_layer: int = _f(-1, "the layer whose MLP input it reads at each option's last token of a "
                                             "multiple-choice question too, for the option's own letter's code on "
                                             "the directions of --binding-letter-xy-layer (-1: not at options)")  # fmt: skip
    binding_box_xy_layer: int = _f(-1, "the layer whose MLP input it reads at each position that predicts a digit of a "
                                   "grounding answer's box too, for the named object's box (x1, y1, x2, y2 in [-1, 1] "
                                   "of the canvas) on the first four directions; those positions are also "
                                   "--binding-place-first-heads queries onto the object (-1: not at boxes)")  # fmt: skip
    binding_object_xy_layer: int = _f(-1, "the layer whose MLP input it reads at each object's centre token of a scene "
                                      "too, for its shape and color codes (+1 its own, -1 the others) on 12 more "
                                      "directions, so that heads can match what a question names (-1: not at "
                                      "objects)")  # fmt: skip
    binding_object_xy_weight: float = _f(1.0, "multiplier of the place loss on the object readout's rows (with "
                                         "--binding-object-xy-layer: 12 codes of every object of a scene, whose "
                                         "first steps' error otherwise outweighs the language loss)")  # fmt: skip
    binding_region_xy_layer: int = _f(-1, "the layer whose MLP input it reads at each option's last token of a "
                                      "multiple-choice position question too, for the centre of the grid cell the "
                                      "option names, (x, y, x, y) on the first four directions as the answer "
                                      "position's readout holds its object's centre (-1: not at those options)")  # fmt: skip
    skip_bad_rows: bool = _f(False, "skip invalid rows (reported at the end and in OUT/skipped_rows.txt)")
    num_workers: int = _f(2, "data-loading processes (0: load in the training process)")

    def __post_init__(self) -> None:
        _check(self.data is not None, "--data META.json is required")
        _check(self.max_seq_length > 0, f"--max-seq-length must be positive, got {self.max_seq_length}")
        _check(self.max_dynamic_patch is None or self.max_dynamic_patch >= 1,
               f"--max-dynamic-patch must be at least 1, got {self.max_dynamic_patch}")  # fmt: skip
        _check(
            1 <= self.min_num_frame <= self.max_num_frame,
            f"need 1 <= --min-num-frame <= --max-num-frame, got {self.min_num_frame} and {self.max_num_frame}",
        )
        _check(
            not self.packing or self.max_packed_tokens >= self.max_seq_length,
            f"--max-packed-tokens {self.max_packed_tokens} must be at least --max-seq-length {self.max_seq_length}",
        )
        _check(self.max_packed_images >= 1, "--max-packed-images must be at least 1")
        _check(self.binding_loss >= 0, f"--binding-loss must be >= 0, got {self.binding_loss}")
        _check(self.binding_count_weight >= 0, f"--binding-count-weight must be >= 0, got {self.binding_count_weight}")
        if self.binding_loss > 0:
            from .binding import parse_heads

            parse_heads(self.binding_heads)
            for _, spec, flag in self.more_binding_heads():
                if spec:
                    parse_heads(spec, flag)
            self.count_sinks()
            self.count_sinks(word=True)
        _check(self.binding_place_xy_loss >= 0, f"--binding-place-xy-loss must be >= 0, got {self.binding_place_xy_loss}")
        _check(self.binding_place_xy_loss == 0 or (self.binding_loss > 0 and self.binding_place_xy_layer >= 0),
               "--binding-place-xy-loss needs --binding-loss > 0 and --binding-place-xy-layer >= 0, got "
               f"{self.binding_loss} and {self.binding_place_xy_layer}")  # fmt: skip
        # the place loss's readouts at other positions use its weight
        for layer, flag in ((self.binding_place_xy_word_layer, "--binding-place-xy-word-layer"),
                            (self.binding_count_xy_layer, "--binding-count-xy-layer"),
                            (self.binding_match_xy_layer, "--binding-match-xy-layer"),
                            (self.binding_count_xy_word_layer, "--binding-count-xy-word-layer"),
                            (self.binding_letter_xy_layer, "--binding-letter-xy-layer"),
                            (self.binding_option_letter_xy_layer, "--binding-option-letter-xy-layer"),
                            (self.binding_box_xy_layer, "--binding-box-xy-layer"),
                            (self.binding_object_xy_layer, "--binding-object-xy-layer"),
                            (self.binding_region_xy_layer, "--binding-region-xy-layer")):  # fmt: skip
            _check(layer < 0 or self.binding_place_xy_loss > 0, f"{flag} {layer} needs --binding-place-xy-loss > 0")
        _check(self.binding_object_xy_weight >= 0,
               f"--binding-object-xy-weight must be >= 0, got {self.binding_object_xy_weight}")
        _check(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")

    def count_sinks(self, word: bool = False) -> list[float]:
        """--binding-count-sinks (`word`: --binding-count-word-sinks) as numbers, one per head of its heads flag
        ([] when not given: 1 each)."""
        from .binding import check_count_sinks

        given, pairs = ((self.binding_count_word_sinks, self.binding_count_word_heads) if word
                        else (self.binding_count_sinks, self.binding_count_heads))  # fmt: skip
        if not given:
            return []
        try:
            sinks = [float(m) for m in given.split(",")]
        except ValueError:
            sinks = []
        heads = len(pairs.split(",")) if pairs else 0
        check_count_sinks(sinks, heads, given, "--binding-count-word" if word else "--binding-count")
        return sinks

    def more_binding_heads(self) -> list[tuple[str, str, str]]:
        """(`BindingObjective` argument, spec, flag) of the binding loss's optional head sets."""
        names = ("answer", "hop", "first", "last", "count", "place_first", "place_last", "letter", "option", "choice",
                 "count_word", "color")  # fmt: skip
        return [(f"{name}_heads", getattr(self, f"binding_{name}_heads"), f"--binding-{name.replace('_', '-')}-heads")
                for name in names]


@dataclass
class TuneArgs:
    """Which parameters train (reference knobs) and LoRA."""

    freeze_vision: bool = _f(False, "freeze the vision encoder (freeze_backbone)")
    freeze_mlp: bool = _f(False, "freeze the projector mlp1")
    freeze_llm: bool = _f(False, "freeze the language model")
    unfreeze_vit_layers: int = _f(0, "train vision layers[k:] even when frozen (negative: the last |k|)")
    unfreeze_lm_head: bool = _f(False, "train lm_head even when the language model is frozen")
    lora_r: int = _f(0, "LoRA rank on the language model (0: none; use_llm_lora)")
    vision_lora_r: int = _f(0, "LoRA rank on the vision encoder (0: none; use_backbone_lora)")
    lora_alpha: float | None = _f(None, "LoRA alpha (default: 2 x rank)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    grad_checkpoint: bool = _f(True, "recompute activations in the backward pass (less memory, slower)")
    drop_path_rate: float = _f(0.0, "stochastic depth of the vision encoder")

    def __post_init__(self) -> None:
        _check(self.lora_r >= 0 and self.vision_lora_r >= 0, "LoRA ranks must be >= 0")
        _check(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        _check(0 <= self.drop_path_rate < 1, f"--drop-path-rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class OptimArgs:
    """AdamW with a cosine schedule and warmup; batch sizes."""

    lr: float = _f(4e-5, "peak learning rate")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms and other 1-D weights)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    lr_scheduler: str = _f("cosine", "learning-rate schedule after warmup", choices=("cosine", "constant"))
    warmup_ratio: float = _f(0.03, "warmup as a fraction of the steps")
    warmup_steps: int = _f(0, "warmup steps (overrides --warmup-ratio when > 0)")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    batch_size: int = _f(1, "samples (or packed sequences) per micro-batch and process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    epochs: float = _f(1.0, "passes over the data")
    max_steps: int = _f(0, "optimizer steps (overrides --epochs when > 0)")

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        _check(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}")
        _check(self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}")
        _check(self.max_steps > 0 or self.epochs > 0, f"--epochs must be positive, got {self.epochs}")


@dataclass
class RunArgs:
    """Devices, precision, checkpoints and logging."""

    seed: int = _f(42, "random seed (data order, initialization, dropout)")
    device: str = _f("auto", "cpu, cuda or auto (the local GPU when there is one)", metavar="DEVICE")
    dtype: str = _f("fp32", "compute dtype; bf16 keeps fp32 master weights; auto: bf16 where the device multiplies it "
                    "natively (a GPU with bf16, a CPU with AMX or AVX512_BF16), else fp32",
                    choices=("fp32", "bf16", "auto"))  # fmt: skip
    threads: int = _f(
        0,
        "CPU threads of the training process (0: auto: on a CPU, the cores left after the "
        "data workers; under torchrun or with OMP_NUM_THREADS set, left as is)",
    )
    resume: bool = _f(False, "continue from the newest checkpoint in OUT")
    save_every: int = _f(
        500, "write a checkpoint every N steps and after the last one (0: only on interruption)"
    )
    keep_last: int = _f(2, "checkpoints to keep")
    stop_after: int = _f(
        0,
        "end this run after step N with a checkpoint, the schedule still spanning all steps (0: off); "
        "--resume continues it",
    )
    log_every: int = _f(10, "log metrics every N steps")
    compile: bool = _f(False, "torch.compile the vision layers and the decoder's norms and feed-forward blocks "
                              "(dynamic shapes; builds its kernels in the first step, about a minute)")
    tensorboard: bool = _f(True, "also log to TensorBoard in OUT/tensorboard (when installed)")

    def __post_init__(self) -> None:
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
               f"--device must be cpu, cuda[:N] or auto, got {self.device!r}")  # fmt: skip
        _check(self.threads >= 0, f"--threads must be >= 0, got {self.threads}")
        _check(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        _check(self.stop_after >= 0, f"--stop-after must be >= 0, got {self.stop_after}")
        _check(self.keep_last >= 1, f"--keep-last must be at least 1, got {self.keep_last}")
        _check(self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}")


GROUPS = {"model": ModelArgs, "data": DataArgs, "tune": TuneArgs, "optim": OptimArgs, "run": RunArgs}


@dataclass
class TrainArgs:
    model: ModelArgs
    data: DataArgs
    tune: TuneArgs = field(default_factory=TuneArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self) -> None:
        _check(
            not self.data.packing or self.optim.max_steps > 0,
            "--packing needs --max-steps: the number of packed sequences per epoch is only known while reading",
        )
        _check(self.tune.lora_r > 0 or self.tune.vision_lora_r > 0 or not self.model.save_merged,
               "--save-merged is for LoRA runs (full fine-tuning always writes the merged model)")  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "arguments") -> TrainArgs:
        """Build from flat keys (the YAML / flag names)."""
        known = {f.name: g for g, c in GROUPS.items() for f in fields(c)}
        unknown = [k for k in values if k not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainingError(f"{source}: unknown key {unknown[0]!r}{hint}")
        parts = {g: {} for g in GROUPS}
        for k, v in values.items():
            parts[known[k]][k] = v
        built = {}
        for g, c in GROUPS.items():
            try:
                built[g] = c(**coerce(c, parts[g], source, TrainingError))
            except TypeError as e:
                raise TrainingError(f"{source}: {e}") from None
        return cls(**built)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for g in GROUPS for k, v in asdict(getattr(self, g)).items()}


# ---- command line -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per field (`--max-seq-length`), bools as `--x/--no-x`; unset flags stay out of the namespace."""
    p.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                   help="YAML file whose keys are these options' names (max_seq_length: 4096); flags win")  # fmt: skip
    for g, cls in GROUPS.items():
        add_options(p.add_argument_group(g, (cls.__doc__ or "").strip()), cls, suppress=True)


def from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """Defaults <- the --config YAML file <- the flags given."""
    values: dict[str, Any] = {}
    config = getattr(ns, "config", None)
    if config:
        values.update(read_yaml(config))
    values.update(values_of(ns, *GROUPS.values()))
    return TrainArgs.from_dict(values, source=str(config) if config else "arguments")


def read_yaml(path: str | Path) -> dict[str, Any]:
    return _read_yaml(path, TrainingError)
