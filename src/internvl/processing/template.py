"""Prompt rendering with the chat templates of the released InternVL checkpoints (the table is `config.TEMPLATES`).

Rendering follows the reference `conversation.py` MPT separator style: system block + sep, then role + message +
sep for every turn, then the bare assistant role (MPT_TWO, GPT-OSS's: a final assistant message ends in `last_sep`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import TEMPLATES, Template
from ..errors import PromptError
from .harmony import FINAL_HEADER, is_harmony

__all__ = ["TEMPLATES", "Template", "get_template", "render_prompt", "stop_strings"]

ROLES = ("user", "assistant")


def get_template(name: str | Template) -> Template:
    """The template called `name` (a `Template` passes through)."""
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise PromptError(f"unknown chat template {name!r}; available: {', '.join(TEMPLATES)}") from None


def render_prompt(
    template: str | Template,
    messages: Sequence[tuple[str, str | None]],
    system_message: str | None = None,
    *,
    omit_empty_system: bool = True,
) -> str:
    """Render (role, text) turns, role in {"user", "assistant"}; a final (assistant, None) leaves the prompt open.

    System message: None means the template default. The reference always writes the system block, so an empty
    string there gives `<|im_start|>system\\n<|im_end|>...`; here "" omits the block instead, matching the
    transformers (-hf) chat template, which has no system prompt. `omit_empty_system=False` restores the
    reference's empty block.

    An empty or None final message writes only the role prefix, as in the reference. Earlier, None is an error
    and "" is a closed empty turn (prefix + sep): the reference would write a bare prefix there, which breaks
    the turn structure of every later message.
    """
    t = get_template(template)
    system = t.system_message if system_message is None else system_message
    out = [] if (system == "" and omit_empty_system) else [t.system_template.format(system) + t.sep]
    for k, (role, text) in enumerate(messages):
        if role not in ROLES:
            raise PromptError(f"message {k}: role must be 'user' or 'assistant', got {role!r}")
        prefix = t.roles[ROLES.index(role)]
        if k == len(messages) - 1 and not text:
            out.append(prefix)
        elif text is None:
            raise PromptError(f"message {k} ({role}) is None; only the last message may be left open")
        else:
            last = k == len(messages) - 1 and role == "assistant" and t.last_sep is not None
            if role == "assistant" and is_harmony(t) and not text.startswith("<|channel|>"):
                text = FINAL_HEADER + text  # an answer shown to the user (final channel only) goes back whole
            out.append(prefix + text + (t.last_sep if last else t.sep))
    return "".join(out)


def stop_strings(template: str | Template) -> list[str]:
    """Strings that end a reply: the separator without its whitespace (the reference eos), or `last_sep` where the
    template has one (GPT-OSS: `<|end|>` also closes an analysis message before the final one), plus stop_str."""
    t = get_template(template)
    stops = [t.last_sep or t.sep.strip()]
    if t.stop_str and t.stop_str not in stops:
        stops.append(t.stop_str)
    return stops
