"""The built-in `nano` model: its configuration and tokenizer, prepared from a Synthetic Visual World split.

    python -m internvl.train.nano prepare --data DIR --out DIR [--vocab-size 1024]

writes `tokenizer.json`, `tokenizer_config.json` and `config.json` (original InternVL layout) into --out;
`internvl finetune --init-from-config OUT/config.json --tokenizer OUT ...` then trains it from scratch
(see runs/train_nano.sh).

    python -m internvl.train.nano snapshot --init DIR --checkpoint OUT/checkpoints/step-N --out DIR

makes a model folder of a training checkpoint of a from-scratch run (the init folder's config and tokenizer,
the checkpoint's weights), for evaluating it or for starting the next stage from it.

    python -m internvl.train.nano curriculum --split DIR --out DIR

writes the training curriculum next to a train split: scenes of one large shape, then of one or two, then
of up to five at the contract's sizes, each with six questions (`synth.writer.generate_dense`), and the
meta files of its stages, in order: `shapes.json` (only the shape questions of the single large shapes),
`stage0.json` (the single large shapes), `stage1a.json` (the scenes of one or two, with a share of the
single ones) and `stage1.json` (the other two sets with a quarter of every task of the split). See
runs/train_nano.sh and configs/train/nano-shapes.yaml.

    python -m internvl.train.nano vit --init DIR --out DIR [--steps 1200]

pretrains the vision encoder on dense per-patch targets drawn from the generator (train/vitpre.py) and
writes a model folder (the init folder's config and tokenizer, the pretrained encoder, the rest random) to
start the language stages from.

    python -m internvl.train.nano ship MODEL --stage NAME [--summary EVAL/summary.json] [--hours H]

copies a trained model folder into the package (`src/internvl/assets/nano`, the built-in model that every
command uses when no model is given) with `training.json`: the recipe stage and step that made it, the
training time, a note (the machine), its accuracy per task on the synthetic test split, and its right
answers on fixed check items.

    python -m internvl.train.nano probe MODEL --data META.json [--n 64]

tells whether a model reads its images at all: the loss on n training rows with their own images and with
the images passed one row along, and how large the image tokens are next to the text embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from ..config import LLMConfig, ModelConfig, VisionConfig
from ..errors import InternVLError
from ..tokenizer import train_bpe_tokenizer

# Sized for a 2-core CPU: 224-px tiles with 14-px patches (64 tokens per tile after pixel shuffle). The recipe
# trains on one tile per image (config max_dynamic_patch 1, the 64-token view that fits the CPU budget); the
# dynamic tiling stays on (dynamic_image_size), and configs/train/nano-stage2.yaml trains up to 4 tiles plus
# the thumbnail, so objects of 14 px keep about their native resolution.
NANO_VISION = dict(hidden_size=192, intermediate_size=768, num_attention_heads=3, num_hidden_layers=6,
                   patch_size=14, image_size=224, qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
                   drop_path_rate=0.0)  # fmt: skip
NANO_LLM = dict(family="qwen2", hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=4096)  # fmt: skip


def nano_config(vocab_size: int) -> ModelConfig:
    """InternViT + pixel shuffle + Qwen2-style decoder, template internvl2_5, dynamic tiling (max 1 tile)."""
    return ModelConfig(
        vision=VisionConfig(**NANO_VISION),
        llm=LLMConfig(vocab_size=vocab_size, **NANO_LLM),
        template="internvl2_5",
        system_message="",  # no system block: the synthetic world needs none, and prompts stay short
        force_image_size=224,
        max_dynamic_patch=1,
    )


def split_texts(split_dir: str | Path) -> Iterator[str]:
    """Every question and answer of a split's JSONL files, without the `<image>` placeholders.

    OCR answers are left out: they are random letter strings, and merges learned from them would split
    text the model reads into arbitrary pairs; without them uppercase strings stay one token per letter.
    """
    for path in sorted(Path(split_dir).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for turn in row.get("conversations", []):
                    if turn["from"] == "gpt" and row.get("task") == "ocr":
                        continue
                    yield turn["value"].replace("<image>", "")
                for key in ("question", "chosen", "rejected"):
                    if key in row:
                        yield row[key].replace("<image>", "")


def prepare(data: str | Path, out: str | Path, vocab_size: int = 1024) -> ModelConfig:
    """Train the tokenizer on the split's text and write it with the nano config into `out`."""
    out = Path(out)
    tokenizer = train_bpe_tokenizer(split_texts(data), out, vocab_size=vocab_size)
    config = nano_config(tokenizer.vocab_size)
    (out / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2, ensure_ascii=False))
    return config


# (folder, items, objects at most, side fractions or None for the contract's, square canvases, seed)
CURRICULUM = (
    ("dense0", 20000, 1, (0.4, 0.9), True, 0),
    ("dense1", 20000, 2, (0.25, 0.5), True, 1),
    ("denseS", 30000, 5, None, False, 2),
)
SPLIT_SHARE = 0.25  # stage 1 takes this share of every task of the train split
STAGE1A_REPLAY = 0.3  # stage 1a keeps this share of the single large shapes next to the scenes of one or two


def curriculum(split: str | Path, out: str | Path, scale: float = 1.0, progress: bool = False) -> dict:
    """The curriculum sets and the two stage meta files (paths relative to `out`); `scale` shrinks them."""
    from ..synth.writer import generate_dense

    split, out = Path(split), Path(out)
    meta_file = split / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file}: not a synthetic split (internvl synth --split train)")
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, n, k, sides, square, seed in CURRICULUM:
        n = max(1, int(n * scale))
        generate_dense(str(out / name), n, k, 6, square, seed, sides, progress)
        entries[name] = {"root": name, "annotation": f"{name}/dense.jsonl", "data_augment": False,
                         "repeat_time": 1, "length": n}  # fmt: skip
    n_shapes = shape_questions(out / "dense0" / "dense.jsonl", out / "dense0" / "shape.jsonl")
    shapes = {"dense0_shape": {**entries["dense0"], "annotation": "dense0/shape.jsonl", "length": n_shapes}}
    stage1a = {"dense0": {**entries["dense0"], "repeat_time": STAGE1A_REPLAY,
                          "length": max(1, int(entries["dense0"]["length"] * STAGE1A_REPLAY))},
               "dense1": entries["dense1"]}  # fmt: skip
    stage1 = {k: v for k, v in entries.items() if k != "dense0"}
    rel = Path(os.path.relpath(split, out))
    for name, entry in json.loads(meta_file.read_text()).items():
        length = max(1, int(entry["length"] * SPLIT_SHARE))
        paths = {"root": str(rel / entry["root"]), "annotation": str(rel / entry["annotation"])}
        stage1[name] = {**entry, **paths, "repeat_time": SPLIT_SHARE, "length": length}
    metas = {"shapes": shapes, "stage0": {"dense0": entries["dense0"]}, "stage1a": stage1a, "stage1": stage1}
    for name, meta in metas.items():
        (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {name: sum(e["length"] for e in meta.values()) for name, meta in metas.items()}


def shape_questions(dense: Path, out: Path) -> int:
    """The `What shape is ...` turns of a dense set, one single-turn row each; returns how many."""
    n = 0
    with open(dense, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
        for line in f:
            row = json.loads(line)
            turns = row["conversations"]
            for q, a in zip(turns[::2], turns[1::2]):
                question = q["value"].replace("<image>\n", "")
                if question.startswith("What shape"):
                    single = [{"from": "human", "value": "<image>\n" + question}, a]
                    w.write(json.dumps({**row, "id": f"{row['id']}_shape", "conversations": single}) + "\n")
                    n += 1
    return n


def snapshot(
    init: str | Path, checkpoint: str | Path, out: str | Path, max_dynamic_patch: int | None = None
) -> Path:
    """A model folder from `init` (config.json, tokenizer files) and `checkpoint`'s model.safetensors; when
    `init` is a model folder (a later stage), the tensors the checkpoint lacks (frozen ones) come from it."""
    init, checkpoint, out = Path(init), Path(checkpoint), Path(out)
    weights = checkpoint / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(
            f"{weights}: no weights in this checkpoint (a from-scratch run saves them all)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in init.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    base = init / "model.safetensors"
    if base.exists():  # a run from a model folder saves only what it trains: the rest comes from the base
        from safetensors.torch import load_file, save_file

        tensors = {**load_file(str(base)), **load_file(str(weights))}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shutil.copy2(weights, out / "model.safetensors")
    if max_dynamic_patch is not None:
        config = json.loads((out / "config.json").read_text())
        config["max_dynamic_patch"] = max_dynamic_patch
        (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json")  # fmt: skip


CHECK_SPLIT, CHECK_N = "val", 10  # the fixed items a shipped model is checked on (tests/test_builtin_model.py)


def check(model_dir: str | Path, work: str | Path, split: str = CHECK_SPLIT, n: int = CHECK_N) -> dict[str, int]:
    """Right answers per task on n generated items of every task of `split` (seeded, greedy, the model's
    own tiling): the figures `ship` records and the test of the shipped model reproduces."""
    from ..api import load
    from ..eval.runner import evaluate
    from ..eval.tasks import SyntheticTask
    from ..synth import TASKS, generate_split

    work = Path(work)
    generate_split(str(work / "split"), split, n=n, tasks=list(TASKS))
    summary = evaluate(load(str(model_dir)), SyntheticTask(work / "split", list(TASKS)), work / "out",
                       batch_size=16, progress=False)  # fmt: skip
    return {task: round(r["accuracy"] * r["n"]) for task, r in summary["tasks"].items()}


def ship(model_dir: str | Path, stage: str, summary: str | Path | None = None, hours: float | None = None,
         dest: str | Path | None = None, notes: str = "", step: int | None = None) -> Path:
    """Copy `model_dir` (a complete model folder in the original layout) into `dest` (default: the package's
    built-in model folder) and write `training.json` there, with the model's right answers on the fixed
    check items (`check`); returns `dest`. `step` defaults to the newest checkpoint next to `model_dir`
    (a run's OUT/final sits beside OUT/checkpoints)."""
    import tempfile

    from ..api import BUILTIN
    from ..config import ModelConfig
    from .checkpoint import find_latest

    src, dest = Path(model_dir), Path(dest) if dest else BUILTIN
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name}: missing; ship needs a complete model folder")
    ModelConfig.from_file(src / "config.json")  # refuses a config the loader would refuse
    info: dict = {"stage": stage, "source": str(src)}
    latest = find_latest(src.parent) if step is None else None
    if latest is not None:
        step = int(json.loads((latest / "state.json").read_text())["step"])
    if step is not None:
        info["step"] = step
    if hours is not None:
        info["training_hours"] = hours
    if notes:
        info["notes"] = notes
    if summary:
        s = json.loads(Path(summary).read_text())
        if "tasks" not in s:
            raise ValueError(f"{summary}: not the summary of `internvl eval synthetic` (no 'tasks')")
        tasks = {k: round(v["accuracy"] * 100, 1) for k, v in s["tasks"].items()}
        info["test_split"] = {"settings": s.get("settings", {}), "accuracy_percent": tasks,
                              "mean_percent": round(s["overall"] * 100, 1)}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        info["check"] = {"split": CHECK_SPLIT, "n": CHECK_N, "correct": check(src, work)}
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        if (src / name).is_file():
            tmp = dest / (name + ".tmp")
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dest / name)
    (dest / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return dest


def probe(model_dir: str | Path, data: str | Path, n: int = 64, batch: int = 16, seed: int = 0) -> dict:
    """Answer-token loss with the right images and with each row given the next row's images (image rows
    only), and the mean norm of image tokens and of text-token embeddings. A model that ignores its images
    has (almost) the same two losses."""
    import random

    import torch

    from ..api import load
    from .collate import Collator
    from .data import build_index, read_meta
    from .dataset import SampleOptions, SFTDataset, pad_token_id
    from .objective import SFTObjective

    m = load(model_dir, optimize=False)
    model, cfg = m.model.float().eval(), m.config
    index = build_index(read_meta(data), check_files=False)
    ds = SFTDataset(index, m.tokenizer, cfg, SampleOptions.for_model(cfg, seed=seed))
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        s = ds[rng.randrange(len(ds))]
        if (
            getattr(s, "image_flags", None) is not None
            and int(s.image_flags.sum()) == s.pixel_values.shape[0] == 1
        ):
            rows.append(s)  # one image per row, so images can be swapped between rows
    collate, objective = Collator(pad_token_id(m.tokenizer), ds.dummy), SFTObjective("token")
    losses = {"own_images": 0.0, "swapped_images": 0.0}
    norms = []
    with torch.no_grad():
        for k in range(0, n, batch):
            b = collate(rows[k : k + batch])
            for key in losses:
                if key == "swapped_images":
                    b.pixel_values = b.pixel_values.roll(1, 0)
                out = objective(model, b)
                losses[key] += float(out.loss_sum) / objective.normalizer(b) * len(rows[k : k + batch]) / n
            norms.append(model.extract_feature(b.pixel_values).norm(dim=-1).mean().item())
    text = model.language_model.model.embed_tokens.weight.norm(dim=-1).mean().item()
    return {**losses, "gap": losses["swapped_images"] - losses["own_images"],
            "image_token_norm": sum(norms) / len(norms), "text_embedding_norm": text}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m internvl.train.nano", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenizer + config.json for training the nano model from scratch")
    p.add_argument("--data", required=True, help="a synthetic split folder (internvl synth --split train)")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=1024)
    p = sub.add_parser("snapshot", help="a model folder from a training checkpoint of a from-scratch run")
    p.add_argument("--init", required=True, help="the folder `prepare` wrote")
    p.add_argument("--checkpoint", required=True, help="OUT/checkpoints/step-N")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--max-dynamic-patch", type=int, default=None, help="the tiling the weights were trained at"
    )
    p = sub.add_parser("curriculum", help="the curriculum sets and stage meta files, next to a train split")
    p.add_argument("--split", required=True, help="the train split folder (internvl synth --split train)")
    p.add_argument("--out", required=True, help="folder for the three sets and stage0.json / stage1.json")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the default set sizes")
    p = sub.add_parser("vit", help="pretrain the vision encoder on dense patch targets (see train/vitpre.py)")
    p.add_argument("--init", required=True, help="the folder `prepare` wrote")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument(
        "--images", type=int, default=20000, help="training images generated once, then cached (see --data)"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-every", type=int, default=250, help="also write the model folder every N steps")
    p.add_argument("--data", default=None, help="the image cache (default OUT/vit_data.npz)")
    p.add_argument(
        "--probe-only", action="store_true", help="train the read-out alone on the random encoder (baseline)"
    )
    p = sub.add_parser("ship", help="copy a trained model into the package as the built-in model")
    p.add_argument("model", help="a complete model folder (e.g. OUT/stage1/final)")
    p.add_argument("--stage", required=True, help="the recipe stage that made it (e.g. stage1)")
    p.add_argument("--summary", default=None, help="internvl eval synthetic's summary.json of this model")
    p.add_argument("--hours", type=float, default=None, help="training time on the machine, all stages")
    p.add_argument("--notes", default="", help="a line on how it was trained (and on which machine)")
    p.add_argument("--step", type=int, default=None,
                   help="the training step of MODEL (default: the newest checkpoint beside it)")
    p.add_argument("--dest", default=None, help="target folder (default: the package's assets/nano)")
    p = sub.add_parser("probe", help="does the model read its images? (loss with own vs swapped images)")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="a fine-tuning meta.json (rows with one image are used)")
    p.add_argument("--n", type=int, default=64)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "probe":
            print(json.dumps(probe(args.model, args.data, args.n), indent=2))
        elif args.cmd == "curriculum":
            print(json.dumps(curriculum(args.split, args.out, args.scale, progress=True)))
        elif args.cmd == "vit":
            from .vitpre import pretrain

            result = pretrain(args.init, args.out, args.steps, args.images, args.batch, args.lr,
                              save_every=args.save_every, data=args.data, train_encoder=not args.probe_only,
                              progress=True)  # fmt: skip
            print(json.dumps(result, indent=2))
        elif args.cmd == "ship":
            print(ship(args.model, args.stage, args.summary, args.hours, args.dest, args.notes, args.step))
        elif args.cmd == "snapshot":
            print(snapshot(args.init, args.checkpoint, args.out, args.max_dynamic_patch))
        else:
            cfg = prepare(args.data, args.out, args.vocab_size)
            print(f"wrote {args.out}/config.json and the tokenizer (vocabulary {cfg.llm.vocab_size})")
    except (InternVLError, OSError, ValueError) as e:  # one line, no traceback
        print(f"{ap.prog} {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
