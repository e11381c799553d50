"""The Python API on a tiny checkpoint: images, several images, video, history, batch_chat and bad input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from refmodels import tiny_checkpoint, write_clip

import internvl
from internvl.api import load
from internvl.engine.sampling import SamplingParams
from internvl.errors import ImageError, PromptError, VideoError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(tiny_checkpoint(tmp_path_factory.mktemp("api")))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (300, 120), (220, 30, 30)).save(d / "wide.png")
    Image.new("RGB", (100, 100), (30, 80, 220)).save(d / "small.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (d / "notavideo.mp4").write_bytes(b"hello")
    write_clip(d / "clip.mp4")
    return d


def test_top_level_load_is_exported():
    assert internvl.load is load


def test_prompt_has_one_span_per_image_with_its_tile_count(model, media):
    ids, pv, asked = model.prepare("What is this?", [media / "wide.png", media / "small.png"], max_num=6)
    tiles = [model.processor(media / name, 6).shape[0] for name in ("wide.png", "small.png")]
    assert pv.shape[0] == sum(tiles) and asked.startswith("Image-1: <image>\nImage-2: <image>\n")
    n_ctx = sum(1 for t in ids if t == model.tokenizer.image_context_id)
    assert n_ctx == pv.shape[0] * model.model.num_image_token
    assert ids.count(model.tokenizer.require("<img>")) == 2


def test_video_prompt_uses_one_tile_per_frame(model, media):
    ids, pv, asked = model.prepare("Describe.", video=media / "clip.mp4", num_segments=4)
    assert pv.shape[0] == 4
    assert asked == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nFrame4: <image>\nDescribe."
    assert isinstance(model.chat("Describe.", video=media / "clip.mp4", num_segments=4, max_new_tokens=4), str)


def test_history_keeps_the_image_prefix_on_the_first_turn(model, media):
    answer, history = model.chat("What color?", media / "wide.png", max_new_tokens=4, return_history=True)
    assert history == [("<image>\nWhat color?", answer)]
    ids, _, asked = model.prepare("And the shape?", media / "wide.png", history=history)
    assert asked == "And the shape?"
    text = model.tokenizer.decode(ids)
    assert text.count("<img>") == 1 and text.index("<img>") < text.index("And the shape?")


def test_stream_chat_adds_up_to_chat(model, media):
    kw = dict(max_new_tokens=12)
    full = model.chat("What color?", media / "small.png", **kw)
    streamed = "".join(model.stream_chat("What color?", media / "small.png", **kw))
    assert streamed.strip() == full


def test_typed_sampling_equals_keyword_options(model, media):
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=1)
    typed = model.chat("What color?", media / "small.png", sampling=params)
    assert typed == model.chat("What color?", media / "small.png", max_new_tokens=6, temperature=0.8, seed=1)
    ids, pv, _ = model.prepare("What color?", media / "small.png")
    assert len(model.generate_ids(ids, pv, sampling=params, max_new_tokens=2)) <= 2  # keywords apply over it
    assert params.max_new_tokens == 6


def test_batch_chat_equals_one_by_one(model, media):
    questions = ["What color?", "Count the shapes.", "Hello"]
    images = [media / "wide.png", [media / "small.png", media / "wide.png"], None]
    batched = model.batch_chat(questions, images, max_new_tokens=10)
    single = [model.chat(q, im, max_new_tokens=10) for q, im in zip(questions, images)]
    assert batched == single


def test_bad_input_raises_typed_errors(model, media):
    with pytest.raises(ImageError, match="missing.png"):
        model.chat("x", media / "missing.png")
    with pytest.raises(ImageError, match="corrupt.png"):
        model.chat("x", media / "corrupt.png")
    with pytest.raises(VideoError, match="notavideo.mp4"):
        model.chat("x", video=media / "notavideo.mp4")
    with pytest.raises(PromptError, match=r"2 <image> placeholder\(s\) but 1 image"):
        model.chat("<image> and <image>?", media / "small.png")
    with pytest.raises(PromptError, match="context is 4096 tokens"):
        model.chat("word " * 5000)


def _int8_round_trip(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 written out here, independent of internvl.kernels: step max|w_row| / 127 (1 for
    an all-zero row), weights rounded to the nearest step in [-127, 127]."""
    w = w.double()
    amax = w.abs().amax(dim=1, keepdim=True)
    step = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.round(w / step).clamp(-127, 127) * step).float()


def test_quantized_int8_model_answers(tmp_path, media):
    m = load(tiny_checkpoint(tmp_path / "q"), quantize="int8")
    # the reference: the same model with every language-model weight replaced by its int8 round trip
    ref = load(tmp_path / "q", optimize=False)
    with torch.no_grad():
        for module in ref.model.language_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(_int8_round_trip(module.weight))
    ids, pv, _ = ref.prepare("What color?", media / "small.png")
    with torch.no_grad():
        want = ref.model(torch.tensor([ids]), pv).logits
        got = m.model(torch.tensor([ids]), pv).logits
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    assert isinstance(m.chat("What color?", media / "small.png", max_new_tokens=5), str)
