"""Rule-based answer extraction for multiple-choice predictions, as VLMEvalKit's exact-matching judge does it.

Mirrors `can_infer_option`, `can_infer_text` and `can_infer` in vlmeval/utils/matching_util.py and the
prefetch step of `extract_answer_from_item` in vlmeval/dataset/utils/multiple_choice.py. No LLM judge:
where VLMEvalKit would fall back to one, `extract_choice` returns None (scored as a miss).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Substrings that mark a refusal; VLMEvalKit maps them to the "no option" letter Z.
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
API_FAILURE = "Failed to obtain answer via API"
# Characters turned into spaces before splitting into tokens, so "(B)", "B.", "[B]", "**B**" all give "B".
PUNCTUATION = ".()[],:;!*#{}"
# The letter must start within the last 4 tokens: VLMEvalKit's `splits.index(ch) > len(splits) - 5`.
TAIL_TOKENS = 4
NO_OPTION = "Z"
# VLMEvalKit's `_VERBOSE_ANSWER_RE` (June 2026, PR #1552): "answer is X" / "correct answer is **X**", any case,
# letters A-D only, tried after the token rule has inferred nothing. It is matched as written there, so
# "the answer is a dog" reads as "A" and no letter from E on is found this way.
VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def tokens(answer: str) -> list[str]:
    for c in PUNCTUATION:
        answer = answer.replace(c, " ")
    return answer.split()


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter an answer names, "Z" for a refusal, or None.

    Rules, in VLMEvalKit's order (vlmeval/utils/matching_util.py as of June 2026):
    1. an API-failure message infers nothing; a known refusal substring gives "Z";
    2. punctuation `.()[],:;!*#{}` becomes spaces and the answer splits on whitespace;
    3. if exactly one distinct option letter appears as a whole token and its first occurrence is among
       the last 4 tokens, it is the answer;
    4. else, if no option letter appears but a lone token "Z" does, the answer is "Z";
    5. else, "answer is X" (`VERBOSE_ANSWER`) anywhere in the raw answer gives X when X is an option:
       this also settles answers that name several letters or put the letter early;
    6. otherwise nothing is inferred.
    Letters inside words ("Bear", "I'm") are not tokens, so rules 3-4 never count them. Case matters there
    ("b" is not "B"), but not in rule 5.
    """
    if API_FAILURE in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return NO_OPTION
    splits = tokens(answer)
    present = [c for c in choices if c in splits]
    if len(present) == 1:
        letter = present[0]
        if splits.index(letter) > len(splits) - (TAIL_TOKENS + 1):
            return letter
    elif not present and NO_OPTION in splits:
        return NO_OPTION
    match = VERBOSE_ANSWER.search(answer)
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option whose text appears in the answer (case-insensitive substring) when exactly one does.

    Answers longer than twice the total length of all option texts infer nothing: a long explanation
    quoting several options by chance should not be read as choosing one.
    """
    low = answer.lower()
    if len(low) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """Option letter first, then option text (VLMEvalKit's `can_infer`)."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def extract_choice(answer: str, choices: Mapping[str, str]) -> str | None:
    """The letter a prediction chooses, "Z" for a refusal or a lone "Z", or None when no rule applies.

    None is where VLMEvalKit's exact-matching judge records "Failed in Prefetch" and scores a miss.
    """
    return can_infer(answer, choices)
