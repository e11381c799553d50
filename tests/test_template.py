"""Golden prompts for every template, written out by hand from the reference conversation.py MPT rules and chat().

Reference rules used: system_template.format(sys) + sep; then role + message + sep per turn; then the bare
assistant role. chat() prepends "<image>\\n" to a first question with images; the k-th <image> becomes
<img> + <IMG_CONTEXT> x (num_image_token * tiles_k) + </img>.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from internvl.errors import PromptError
from internvl.processing import (
    TEMPLATES,
    build_conversation_prompt,
    build_question,
    expand_image_placeholders,
    get_template,
    render_prompt,
    stop_strings,
)

SYS_25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SYS_2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


def test_internvl2_5_single_image():
    p = build_conversation_prompt("internvl2_5", "Describe the image.", num_images=1)
    assert p.question == "<image>\nDescribe the image."
    assert p.text == (
        "<|im_start|>system\n" + SYS_25 + "<|im_end|>\n"
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    expanded = build_conversation_prompt(
        "internvl2_5", "Describe the image.", num_images=1, num_patches_list=[2], num_image_token=3
    ).text
    assert expanded == (
        "<|im_start|>system\n" + SYS_25 + "<|im_end|>\n"
        "<|im_start|>user\n<img>"
        "<IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT>"
        "</img>\nDescribe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_internlm2_chat_several_images():
    p = build_conversation_prompt("internlm2-chat", "What differs?", num_images=2)
    assert p.text == (
        "<|im_start|>system\n" + SYS_2 + "<|im_end|>"
        "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\nWhat differs?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    expanded = build_conversation_prompt(
        "internlm2-chat", "What differs?", num_images=2, num_patches_list=[1, 2], num_image_token=1
    ).text
    assert "Image-1: <img><IMG_CONTEXT></img>\nImage-2: <img><IMG_CONTEXT><IMG_CONTEXT></img>\n" in expanded


def test_hermes2_video():
    p = build_conversation_prompt("Hermes-2", "What happens?", num_frames=3)
    assert p.text == (
        "<|im_start|>system\n" + SYS_2 + "<|im_end|>"
        "<|im_start|>user\nFrame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat happens?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    expanded = build_conversation_prompt(
        "Hermes-2", "What happens?", num_frames=2, num_patches_list=[1, 1], num_image_token=2
    ).text
    assert (
        "Frame1: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nFrame2: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat"
        in expanded
    )


def test_phi3_multi_turn_keeps_images_in_the_first_turn():
    p = build_conversation_prompt(
        "phi3-chat", "What colour?", [("<image>\nWhat is it?", "A cat.")], num_images=1
    )
    assert p.question == "What colour?"  # the history turn already holds the image
    assert p.text == (
        "<|system|>\n" + SYS_2 + "<|end|>"
        "<|user|>\n<image>\nWhat is it?<|end|>"
        "<|assistant|>\nA cat.<|end|>"
        "<|user|>\nWhat colour?<|end|>"
        "<|assistant|>\n"
    )


def test_internvl2_5_multi_turn_expanded():
    history = [("<image>\nQ1", "A1"), ("Q2", "A2")]
    p = build_conversation_prompt(
        "internvl2_5", "Q3", history, num_images=1, num_patches_list=[1], num_image_token=2
    )
    assert p.text == (
        "<|im_start|>system\n" + SYS_25 + "<|im_end|>\n"
        "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n"
        "<|im_start|>user\nQ3<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_next_turn_extends_the_previous_prompt():
    first = build_conversation_prompt("internvl2_5", "Q1", num_images=1)
    second = build_conversation_prompt("internvl2_5", "Q2", [(first.question, "A1")], num_images=1)
    assert second.text.startswith(first.text)  # so a KV cache of the first prompt stays valid
    later = build_conversation_prompt("internvl2_5", "Q2", [("Q1", "A1")], num_images=1)
    assert later.question == "<image>\nQ2"  # no image in the history yet: it goes on this question


def test_custom_system_message():
    assert render_prompt(
        "internvl2_5", [("user", "Hello"), ("assistant", None)], "You are a helpful assistant."
    ) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt("phi3-chat", [("user", "Hello"), ("assistant", None)], "Be brief.") == (
        "<|system|>\nBe brief.<|end|><|user|>\nHello<|end|><|assistant|>\n"
    )


def test_empty_system_message():
    turns = [("user", "Hello"), ("assistant", None)]
    # "" omits the block (the -hf chat template has no system prompt) ...
    assert (
        render_prompt("internvl2_5", turns, "")
        == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        render_prompt("internlm2-chat", turns, "")
        == "<|im_start|>user\nHello<|im_end|><|im_start|>assistant\n"
    )
    assert render_prompt("phi3-chat", turns, "") == "<|user|>\nHello<|end|><|assistant|>\n"
    # ... while the reference MPT style always writes it, even empty
    assert render_prompt("internvl2_5", turns, "", omit_empty_system=False) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    # None is the template default, never the string "None"
    assert render_prompt("Hermes-2", turns, None).startswith("<|im_start|>system\n" + SYS_2 + "<|im_end|>")


def test_empty_turns():
    msgs = [("user", "Hi"), ("assistant", ""), ("user", "Again"), ("assistant", "")]
    assert render_prompt("internvl2_5", msgs, "") == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(
        PromptError, match=r"message 1 \(assistant\) is None; only the last message may be left open"
    ):
        render_prompt("internvl2_5", [("user", "Hi"), ("assistant", None), ("user", "Again")])
    with pytest.raises(PromptError, match="message 0: role must be 'user' or 'assistant', got 'system'"):
        render_prompt("internvl2_5", [("system", "x")])


def test_templates_and_stop_strings():
    assert set(TEMPLATES) == {"internvl2_5", "internlm2-chat", "Hermes-2", "phi3-chat", "internvl3_5_gpt_oss"}
    assert stop_strings("internvl3_5_gpt_oss") == ["<|return|>"]  # golden prompts in test_family_gpt_oss.py
    assert stop_strings("internvl2_5") == ["<|im_end|>"]
    assert stop_strings("internlm2-chat") == ["<|im_end|>"]
    assert stop_strings("Hermes-2") == ["<|im_end|>", "<|endoftext|>"]
    assert stop_strings("phi3-chat") == ["<|end|>"]
    assert get_template(get_template("phi3-chat")).sep == "<|end|>"
    with pytest.raises(
        PromptError, match="unknown chat template 'vicuna'; available: internvl2_5, internlm2-chat"
    ):
        get_template("vicuna")


def test_build_question_placeholders():
    assert build_question("Q") == "Q"
    assert build_question("Q", num_images=1) == "<image>\nQ"
    assert build_question("Look: <image> then answer", num_images=1) == "Look: <image> then answer"
    assert build_question("Q", num_images=3) == "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nQ"
    assert build_question("Q", num_frames=2) == "Frame1: <image>\nFrame2: <image>\nQ"
    assert build_question("<video>\nQ", num_frames=2) == "Frame1: <image>\nFrame2: <image>\nQ"
    assert build_question("See <video> now", num_frames=2) == "See Frame1: <image>\nFrame2: <image> now"
    assert build_question("Q", num_images=1, num_frames=1) == "<image>\nFrame1: <image>\nQ"
    with pytest.raises(PromptError, match="contains <video> but no video frames"):
        build_question("<video>\nQ")


def test_expand_checks_counts():
    assert expand_image_placeholders("a<image>b<image>c", [1, 2], 1) == (
        "a<img><IMG_CONTEXT></img>b<img><IMG_CONTEXT><IMG_CONTEXT></img>c"
    )
    assert expand_image_placeholders("[<image>]", [1], 2, "<s>", "</s>", "X") == "[<s>XX</s>]"
    with pytest.raises(
        PromptError, match=r"has 2 <image> placeholder\(s\) but 1 image\(s\) \(num_patches_list=\[3\]\)"
    ):
        expand_image_placeholders("<image><image>", [3], 256)
    with pytest.raises(PromptError, match=r"has 0 <image> placeholder\(s\) but 2 image\(s\)"):
        expand_image_placeholders("no images here", [1, 1], 256)
    with pytest.raises(PromptError, match="image 0 has 0 tiles"):
        expand_image_placeholders("<image>", [0], 256)
    with pytest.raises(PromptError, match=r"has 1 <image> placeholder\(s\) but 2 image\(s\)"):
        build_conversation_prompt("internvl2_5", "<image> Q", num_images=2, num_patches_list=[1, 1])


def test_expansion_matches_transformers_internvl_processor():
    # The processor's own replacement methods, called on a stand-in holding its token strings (building a
    # full InternVLProcessor needs a hub tokenizer and torchvision, neither available offline).
    hf = pytest.importorskip("transformers.models.internvl.processing_internvl")
    fake = SimpleNamespace(
        start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>", image_seq_length=4
    )
    for tiles in ([13], [1, 7]):
        theirs = [
            hf.InternVLProcessor.replace_image_token(fake, {"num_patches": tiles}, k)
            for k in range(len(tiles))
        ]
        ours = expand_image_placeholders("|".join(["<image>"] * len(tiles)), tiles, 4)
        assert ours == "|".join(theirs)
    video = SimpleNamespace(shape=(3, 3, 448, 448))  # 3 frames
    theirs = hf.InternVLProcessor.replace_video_token(fake, {"pixel_values_videos": [video]}, 0)
    ours = expand_image_placeholders(build_question("<video>\nQ", num_frames=3), [1, 1, 1], 4)
    assert ours == theirs + "\nQ"


def test_one_template_table_serves_the_config_the_prompts_and_the_training_flags():
    from internvl import config
    from internvl.errors import ConfigError
    from internvl.presets import preset
    from internvl.train.args import ModelArgs

    assert TEMPLATES is config.TEMPLATES
    choices = next(f for f in dataclasses.fields(ModelArgs) if f.name == "template").metadata["choices"]
    assert list(choices) == list(TEMPLATES)
    with pytest.raises(ConfigError, match=r"template: expected one of \['internvl2_5', 'internlm2-chat'"):
        preset("tiny", template="vicuna")
