"""Chat and instruction documents: parse conversations, render them with the teacher's own chat
template, and mark which tokens carry teacher targets.

A corpus record is a conversation when it has OpenAI-style `messages` (system / user / assistant /
tool turns, assistant turns may carry `tool_calls`, a record may carry `tools`), or `prompt` and
`response` (or `completion`) fields. It is rendered by the teacher tokenizer's
`apply_chat_template`, so special tokens, generation prompts and tool formatting are exactly what
the template defines, and becomes one document for packing.

Which tokens get targets (`--targets`):
- `all`: every token, as for plain text;
- `assistant`: the tokens the assistant wrote, in every assistant turn (end-of-turn marker
  included: the student must learn to stop);
- `last-assistant`: only the final assistant turn.

Assistant spans come from the template itself: where it marks them with `{% generation %}`,
transformers' assistant mask is used; otherwise the conversation is rendered prefix by prefix
(the prompt up to turn i with the generation prompt, then up to and including turn i), and the
text between the two is the assistant's. A template that does not render a conversation prefix
by prefix (some drop earlier reasoning) cannot be split that way: the conversation is rejected
with that reason (and counted), never masked by guesswork.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError

TARGET_POLICIES = ("auto", "all", "assistant", "last-assistant")
ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatError(KdcacheError):
    """A conversation that cannot be rendered or masked (the reason says why)."""


@dataclass(frozen=True)
class Conversation:
    """One conversation as JSON data: the messages and, optionally, the tools offered."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": [dict(m) for m in self.messages]}
        if self.tools:
            out["tools"] = [dict(t) for t in self.tools]
        return out


def is_chat_record(obj: Any) -> bool:
    return isinstance(obj, dict) and ("messages" in obj or "prompt" in obj)


def conversation_from_record(obj: dict[str, Any]) -> Conversation:
    """A Conversation from a corpus record, or ChatError naming what is wrong with it."""
    tools = obj.get("tools")
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(t, dict) for t in tools)):
        raise ChatError("'tools' must be a list of objects")
    if "messages" in obj:
        messages = obj["messages"]
    else:
        prompt = obj.get("prompt")
        response = obj.get("response", obj.get("completion"))
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            messages = list(prompt)
        else:
            raise ChatError("'prompt' must be a string or a list of messages")
        if response is not None:
            if not isinstance(response, str):
                raise ChatError("'response' must be a string")
            messages = messages + [{"role": "assistant", "content": response}]
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"message {i} has role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise ChatError(f"message {i} ({role}) has no content")
        if content is not None and not isinstance(content, (str, list)):
            raise ChatError(f"message {i} ({role}) content must be a string or a list of parts")
    return Conversation(messages=tuple(messages), tools=tuple(tools) if tools else None)


def resolve_policy(policy: str, has_chat: bool) -> str:
    """`auto` means `assistant` for a chat corpus and `all` for plain text."""
    if policy not in TARGET_POLICIES:
        raise ChatError(f"--targets must be one of {', '.join(TARGET_POLICIES)}, got {policy!r}")
    if policy == "auto":
        return "assistant" if has_chat else "all"
    return policy


def render_text(tokenizer: Any, conv: Conversation, *, add_generation_prompt: bool,
                messages: Any = None) -> str:
    """The template's text of `conv` (or of its first messages); ChatError if it refuses."""
    try:
        return tokenizer.apply_chat_template(
            list(conv.messages if messages is None else messages),
            tools=list(conv.tools) if conv.tools else None, tokenize=False,
            add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja's raise_exception and template errors of any type
        raise ChatError(f"the chat template rejected the conversation: {exc}") from None


@dataclass
class RenderedChat:
    """Token ids (no leading BOS: the packer adds it) and a per-token target mask."""

    ids: list[int]
    target_mask: np.ndarray  # bool [len(ids)]: True where the token is a target token
    text: str = field(repr=False, default="")


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template and masks the target tokens."""

    def __init__(self, tokenizer: Any, bos_id: int | None, policy: str) -> None:
        if policy not in ("all", "assistant", "last-assistant"):
            raise ChatError(f"unresolved target policy {policy!r}")
        if not getattr(tokenizer, "chat_template", None):
            raise ChatError("the teacher's tokenizer has no chat template (tokenizer_config.json "
                            "'chat_template' or chat_template.jinja); chat corpora need one")
        if not getattr(tokenizer, "is_fast", False):
            raise ChatError("chat corpora need a fast tokenizer (tokenizer.json) to map the "
                            "rendered text to tokens")
        self.tok, self.bos_id, self.policy = tokenizer, bos_id, policy
        template = tokenizer.chat_template
        text = template if isinstance(template, str) else " ".join(template.values())
        self.has_generation_tags = "{% generation %}" in text or "{%- generation %}" in text

    def _text(self, conv: Conversation, messages, add_generation_prompt: bool) -> str:
        return render_text(self.tok, conv, messages=messages,
                           add_generation_prompt=add_generation_prompt)

    def _assistant_spans(self, conv: Conversation, full: str) -> list[tuple[int, int]]:
        turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
        if not turns:
            raise ChatError("the conversation has no assistant turn to take targets from")
        if self.policy == "last-assistant":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = self._text(conv, conv.messages[:i], add_generation_prompt=True)
            upto = self._text(conv, conv.messages[:i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ChatError(f"the chat template does not render this conversation prefix "
                                f"by prefix (turn {i}), so its assistant tokens cannot be located; "
                                "use a template with {% generation %} tags or --targets all")
            spans.append((len(before), len(upto)))
        return spans

    def render(self, conv: Conversation) -> RenderedChat:
        full = self._text(conv, conv.messages, add_generation_prompt=False)
        if self.policy == "assistant" and self.has_generation_tags:
            return self._render_generation_tags(conv, full)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = np.fromiter((s for s, _ in enc["offset_mapping"]), dtype=np.int64,
                             count=len(ids))
        if self.policy == "all":
            mask = np.ones(len(ids), dtype=bool)
        else:
            mask = np.zeros(len(ids), dtype=bool)
            for lo, hi in self._assistant_spans(conv, full):
                mask |= (starts >= lo) & (starts < hi)
        return self._strip_bos(ids, mask, full)

    def _render_generation_tags(self, conv: Conversation, full: str) -> RenderedChat:
        try:
            out = self.tok.apply_chat_template(
                list(conv.messages), tools=list(conv.tools) if conv.tools else None,
                tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        except Exception as exc:
            raise ChatError(f"the chat template rejected the conversation: {exc}") from None
        ids = list(out["input_ids"])
        mask = np.asarray(out["assistant_masks"], dtype=bool)
        if not mask.any():
            raise ChatError("the chat template marked no assistant tokens")
        return self._strip_bos(ids, mask, full)

    def _strip_bos(self, ids: list[int], mask: np.ndarray, text: str) -> RenderedChat:
        if ids and self.bos_id is not None and ids[0] == self.bos_id:
            ids, mask = ids[1:], mask[1:]
        if not ids:
            raise ChatError("the conversation renders to no tokens")
        return RenderedChat(ids=ids, target_mask=mask, text=text)


# A ChatML-style template for locally built teachers (the demo, tests): role markers are plain
# text, each turn ends with the tokenizer's EOS, and tool calls / tool results render as JSON.
BUILTIN_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {{ tools | tojson }}</s>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}<call>{{ c['function'] | tojson }}</call>{% endfor %}"
    "</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
