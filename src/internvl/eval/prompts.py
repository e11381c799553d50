"""Benchmark prompts: multiple-choice (InternVL wrapper and VLMEvalKit default layouts) and short-answer VQA.

Strings and newlines are VLMEvalKit's, byte for byte; each builder names the function it mirrors.
"""

from __future__ import annotations

import re

from internvl.eval.items import EvalItem

MCQ_DIRECTIVE = "Answer with the option's letter from the given choices directly."
MCQ_DIRECTIVE_CN = "请直接回答选项字母。"
OPEN_DIRECTIVE = "Answer the question directly."
OPEN_DIRECTIVE_CN = "请直接回答问题。"
# The trailing " \n" is VLMEvalKit's own.
VLMEVAL_DIRECTIVE = "Please select the correct answer from the options above. \n"
SHORT_ANSWER = "Answer the question using a single word or phrase."
# `build_mcq_cot_prompt` in vlmeval/vlm/internvl/utils.py, used there when USE_COT=1.
MCQ_COT = (
    "Answer the preceding multiple choice question. The last line of your response should follow "
    "this format: 'Answer: \\boxed{$LETTER}' (without quotes), where LETTER is one of the options. "
    "If you are uncertain or the problem is too complex, make a reasoned guess based on the "
    "information provided. Avoid repeating steps indefinitely—provide your best guess even if "
    "unsure. Think step by step logically, considering all relevant information before answering."
)

_CJK = re.compile("[\u4e00-\u9fff]")


def cn_string(text: str) -> bool:
    """VLMEvalKit's `cn_string`: whether the text holds any CJK ideograph (picks the Chinese directive)."""
    return _CJK.search(text) is not None


def build_mcq_prompt(item: EvalItem, style: str = "internvl", cot: bool = False) -> str:
    """The text part of a multiple-choice prompt; the image placeholder is the chat template's job.

    style="internvl" mirrors `build_multi_choice_prompt` in VLMEvalKit's vlmeval/vlm/internvl/utils.py:
        [hint "\\n"] question ("\\n" letter ". " text)* "\\n" directive
    with no trailing newline, the directive in Chinese when the prompt holds CJK characters, and
    "Answer the question directly." when the item has no options. `cot` applies its USE_COT=1 rewrite.

    style="vlmeval" mirrors `ImageMCQDataset.build_prompt` in vlmeval/dataset/image_mcq.py:
        ["Hint: " hint "\\n"] "Question: " question "\\n" ["Options:\\n" (letter ". " text "\\n")*
        "Please select the correct answer from the options above. \\n"]
    """
    if style == "internvl":
        prompt = item.question if item.hint is None else f"{item.hint}\n{item.question}"
        for letter, text in item.options.items():
            prompt += f"\n{letter}. {text}"
        if item.options:
            prompt += "\n" + (MCQ_DIRECTIVE_CN if cn_string(prompt) else MCQ_DIRECTIVE)
        else:
            prompt += "\n" + (OPEN_DIRECTIVE_CN if cn_string(prompt) else OPEN_DIRECTIVE)
        if cot:
            prompt = prompt.replace(MCQ_DIRECTIVE, "").strip() + "\n" + MCQ_COT
        return prompt
    if style == "vlmeval":
        if cot:
            raise ValueError("cot=True exists only for style='internvl' (the InternVL wrapper's USE_COT)")
        prompt = "" if item.hint is None else f"Hint: {item.hint}\n"
        prompt += f"Question: {item.question}\n"
        if item.options:
            prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in item.options.items())
            prompt += VLMEVAL_DIRECTIVE
        return prompt
    raise ValueError(f"unknown MCQ prompt style {style!r}; expected 'internvl' or 'vlmeval'")


def build_vqa_prompt(question: str, sep: str = "\n") -> str:
    """Short-answer prompt of the InternVL wrapper for OCR/VQA sets (TextVQA, DocVQA, ChartQA, ...):
    question + "\\n" + "Answer the question using a single word or phrase." Its MME (yes/no) prompt
    joins with a space instead: pass sep=" "."""
    return f"{question}{sep}{SHORT_ANSWER}"
