"""Does a model read its images? The answer loss with each row's own image and with the next row's image, and
the size of the image tokens next to the text embeddings (`internvl nano probe`)."""

from __future__ import annotations

from pathlib import Path


def probe(model_dir: str | Path, data: str | Path, n: int = 64, batch: int = 16, seed: int = 0) -> dict:
    """Answer-token loss with the right images and with each row given the next row's images (image rows
    only), and the mean norm of image tokens and of text-token embeddings. A model that ignores its images
    has (almost) the same two losses."""
    import random

    import torch

    from ..api import load
    from ..train.collate import Collator
    from ..train.data import build_index, read_meta
    from ..train.dataset import SampleOptions, SFTDataset, pad_token_id
    from ..train.objective import SFTObjective

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
