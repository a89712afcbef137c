"""Chat contexts: the edit prompt as the user's chat message, rendered by the model's own chat template.

What a user of the deployed model sees is the assistant's reply to a question, not the continuation of a
sentence. With chat contexts on, z-optimisation (and MPES's stop rule) also asks for the new answer

- `reply`: as the assistant's first word ("<user>{}<end><assistant>Rome");
- `restated`: after the assistant repeats the prompt ("<user>{}<end><assistant>{} Rome"), δ at both subjects;

and the keys are read where the subject sits in them (`chat_keys`): a second key column per fact solved toward the
same target value (`separate`), one key mixing both (`shared`), or a second key column with a target value of its
own, optimised on the chat contexts alone (`own`), so the text key keeps the small δ the text contexts need. Which mix works, and what it costs: docs/method.md, "Chat contexts".
"""

from __future__ import annotations

CHAT_CONTEXT_CHOICES = ("auto", "on", "off")
CHAT_KEY_CHOICES = ("separate", "shared", "own")
CHAT_CONTEXT_KINDS = ("reply", "restated")
# `chat_kinds` in [edit]: which of the chat contexts z-optimisation reads ("both" = all of CHAT_CONTEXT_KINDS).
CHAT_KIND_CHOICES = ("both", "reply", "restated")

# Stands for the prompt while the template is rendered: plain letters, which no template trims or escapes.
_MARK = "PROMPTMARKERXQZ"


def chat_contexts_wanted(setting: str, has_template: bool) -> bool:
    """Whether chat contexts are used: `on`, or `auto` with a chat template."""
    if setting not in CHAT_CONTEXT_CHOICES:
        raise ValueError(f"chat_contexts must be one of {CHAT_CONTEXT_CHOICES}, not {setting!r}")
    return setting == "on" or (setting == "auto" and has_template)


def chat_kinds(setting: str) -> tuple[str, ...]:
    """The chat context kinds a `chat_kinds` setting names."""
    if setting not in CHAT_KIND_CHOICES:
        raise ValueError(f"chat_kinds must be one of {CHAT_KIND_CHOICES}, not {setting!r}")
    return CHAT_CONTEXT_KINDS if setting == "both" else (setting,)


def chat_templates(tokenizer, kinds: tuple[str, ...] = CHAT_CONTEXT_KINDS) -> list[str]:
    """Context templates ("{}" marks the prompt) for the chat contexts `kinds`, in the model's own template
    with its default system prompt, if any; [] when the tokenizer has no template or it cannot hold one."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}], add_generation_prompt=True, tokenize=False
    )
    if not isinstance(rendered, str) or "{}" in rendered or rendered.count(_MARK) != 1:
        return []
    reply = rendered.replace(_MARK, "{}")
    # The answer opens the reply (no leading space) exactly when the template does not end with the prompt
    # (`keys.answer_follows_prompt`).
    made = {"reply": reply, "restated": reply + "{}"}
    return [made[k] for k in kinds]
