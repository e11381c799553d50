"""The VisualPRM prompt layout (arXiv 2503.10291): a solution split into steps, one user turn per step, `+` or `-`
from the assistant after each, under the official PRM system prompt (OpenGVLab/InternVL `utils/constants.py`)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..processing.prompt import IMAGE_PLACEHOLDER
from ..processing.template import get_template, render_prompt

PLUS, MINUS = "+", "-"

# verbatim from the reference `PRM_SYSTEM_PROMPT` (the system turn of every VisualPRM400K row)
PRM_SYSTEM_PROMPT = """You are an advanced AI assistant, designed to serve as a process supervision model. In this task, \
I will provide a problem statement followed by the first step of the solution process. For each subsequent turn, I will \
give you a new step in the solution. Your role is to assess whether the solution process is correct up to the current \
step.

- In the **first round**, I will input the problem and the first step of the solution process.
- In **each subsequent round**, I will provide the next step in the solution.

For each step, you should:

- Respond with **"+"** if you believe the solution process is correct up to this step.
- Respond with **"-"** if you detect any issues or errors in the process up to this step.

Please note:
- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or justifications.

Your task is to verify the accuracy and correctness of each step in the given solution process."""

_SENTENCE = re.compile(r"\n+|(?<=\.)[ \t]+")  # a line end, or the spaces after a sentence's period


def _pieces(text: str, pattern: re.Pattern) -> list[tuple[int, int]]:
    """(start, end) of the non-blank pieces of `text` between the matches of `pattern`, outer spaces trimmed."""
    spans, start = [], 0
    for m in [*pattern.finditer(text), None]:
        end = m.start() if m else len(text)
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        start = m.end() if m else start
    return spans


def split_steps(response: str, max_steps: int | None = None) -> list[str]:
    """The steps of a solution. As the reference `split_response`: paragraphs separated by a blank line, and with
    `max_steps`, consecutive steps merged into groups of ceil(n / max_steps). A solution of one paragraph (the
    synthetic world's chains) splits at line ends and sentence ends instead, so that
    "There are 3 circles and 1 square. 3 - 1 = 2.\\nAnswer: 2" is three steps. The steps are slices of the text."""
    spans = _pieces(response, re.compile(r"\n\s*\n"))
    if len(spans) == 1:
        spans = _pieces(response, _SENTENCE)
    if not spans:
        return [response.strip()]
    if max_steps is not None and len(spans) > max_steps:
        size = math.ceil(len(spans) / max_steps)
        spans = [(spans[i][0], spans[min(i + size, len(spans)) - 1][1]) for i in range(0, len(spans), size)]
    return [response[a:b] for a, b in spans]


def step_turns(question: str, steps: Sequence[str], image: bool = True) -> list[str]:
    """The user turns: `### Question:\\n{question}\\n\\n### Solution Process:\\n{step 1}`, then one turn per step.
    With an image, `<image>\\n` opens the question unless it already has a placeholder (the reference scorer)."""
    if not steps:
        raise ValueError("a solution needs at least one step")
    if image and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    return [f"### Question:\n{question}\n\n### Solution Process:\n{steps[0]}", *steps[1:]]


def orm_turn(question: str, response: str, image: bool = True) -> str:
    """The outcome-only (ORM) layout: the whole solution in the one user turn."""
    return step_turns(question, [response], image)[0]


def prm_conversation(question: str, steps: Sequence[str], labels: Sequence[bool] | None = None,
                     image: bool = True) -> list[tuple[str, str]]:  # fmt: skip
    """(user, assistant) turns; the assistant says `+` for a correct step and `-` for a wrong one (None: all `+`,
    the placeholder answers of the scoring prompt)."""
    labels = [True] * len(steps) if labels is None else list(labels)
    if len(labels) != len(steps):
        raise ValueError(f"{len(steps)} steps but {len(labels)} labels")
    return [(u, PLUS if ok else MINUS) for u, ok in zip(step_turns(question, steps, image), labels)]


def prm_text(template: str, question: str, steps: Sequence[str], system_message: str | None = PRM_SYSTEM_PROMPT,
             image: bool = True) -> str:  # fmt: skip
    """The scoring prompt as text (placeholders unexpanded): every step but the last answered `+`, the last one's
    assistant turn left open. The score of step k is read where the assistant's answer to step k starts."""
    turns = prm_conversation(question, steps, image=image)
    messages = [m for user, answer in turns[:-1] for m in (("user", user), ("assistant", answer))]
    messages += [("user", turns[-1][0]), ("assistant", None)]
    return render_prompt(template, messages, system_message)


def answer_slots(ids: Sequence[int], template: str, encode) -> list[int]:
    """Positions whose next token is a `+` answer: the last token of every `{assistant role}+{sep}` (the reference
    `find_placeholder_idx`), then the prompt's last token (the open assistant turn)."""
    t = get_template(template)
    role = encode(t.roles[1])
    target = encode(t.roles[1] + PLUS + t.sep)
    ids, n = list(ids), len(target)
    found = [i + len(role) - 1 for i in range(len(ids) - n + 1) if ids[i : i + n] == target]
    return found + [len(ids) - 1]
