"""The DeepSeek-V3.1 chat format on the server (REFERENCE §11): prompts in, reasoning / content / tool calls out.

Prompt: :func:`chat_prompt` renders the request's messages and ``tools`` with the checkpoint's jinja2
``chat_template`` when it has one, else the built-in V3.1 layout (:mod:`dsv3_jax.data.chat_format`), ending in
the generation prompt ``<｜Assistant｜><think>`` (thinking) or ``<｜Assistant｜></think>`` (non-thinking).
``chat_template_kwargs: {"thinking": true|false}`` picks the mode (default false), as in vLLM and SGLang.

Output: :class:`OutputParser` turns the generated text, fed in any chunks, into a list of :class:`Delta`:

- thinking mode: the text before ``</think>`` is ``reasoning`` (a leading ``<think>`` is dropped); what follows
  is ``content``; a stream that never closes its thinking is all reasoning;
- when the request has ``tools``: ``content`` up to ``<｜tool▁calls▁begin｜>``, then each
  ``<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{JSON object}<｜tool▁call▁end｜>`` becomes one ``tool_call``, until
  ``<｜tool▁calls▁end｜>`` (anything after it is content again).

A call is emitted once its markup is complete — one tool_call delta carrying id, name and the whole arguments —
so a malformed call (no separator, empty name, arguments that are not a JSON object, markup that never closes,
text between calls) is never half-sent: its raw text comes back as ``content`` instead, and so do the section's
``<｜tool▁calls▁begin｜>`` / ``<｜tool▁calls▁end｜>`` markers when no call in it parsed. Marker text split across chunks is held back until it
is decided, so the deltas of any chunking concatenate to the same result (the non-streaming response is the
parse of the whole text).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dsv3_jax.data import chat_format as cf

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclass(frozen=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # the model's JSON text (an object)

    def openai(self, delta: bool = False) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index} | call if delta else call


@dataclass(frozen=True)
class Delta:
    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    call: ToolCall | None = None

    def openai(self) -> dict[str, Any]:
        """The ``delta`` object of a streamed chat chunk."""
        if self.kind == "tool_call":
            assert self.call is not None
            return {"tool_calls": [self.call.openai(delta=True)]}
        return {"reasoning_content" if self.kind == "reasoning" else "content": self.text}


def thinking_of(chat_template_kwargs: dict[str, Any] | None) -> bool:
    """The mode ``chat_template_kwargs`` asks for (ValueError when ``thinking`` is not a bool)."""
    value = (chat_template_kwargs or {}).get("thinking", False)
    if not isinstance(value, bool):
        raise ValueError(f"chat_template_kwargs.thinking must be true or false, got {value!r}")  # noqa: TRY004
    return value


def tools_for(tools: Sequence[dict] | None, tool_choice: Any) -> list[dict] | None:
    """The tools to render and parse: none for ``tool_choice: "none"``; ``"auto"`` (the default) lets the model
    choose. Forcing a call (``"required"`` or a named function) needs constrained decoding: a ValueError."""
    if tool_choice not in (None, "auto", "none"):
        raise ValueError(f"tool_choice={tool_choice!r}: only 'auto' and 'none' are supported")
    return list(tools) if tools and tool_choice != "none" else None


def chat_prompt(messages: Sequence[dict[str, Any]], tokenizer: Any, tools: Sequence[dict] | None = None,
                thinking: bool = False, template: str | None = None) -> list[int]:
    """Token ids of ``messages`` (OpenAI dicts) with the generation prompt; raises ``ChatFormatError``.
    Layout markers are tokenised as special tokens, message text plainly (it cannot inject a marker)."""
    msgs = [m | {"role": ROLE_ALIASES.get(m.get("role"), m.get("role"))} for m in messages]
    if msgs[-1]["role"] == "assistant":
        raise cf.ChatFormatError("the last message is the assistant's: continuing an assistant turn is not "
                                 "supported (end with a user or tool message)")
    if template is not None:
        bos = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else ""
        spans = cf.render_jinja(template, msgs, tools, thinking=thinking, add_generation_prompt=True,
                                bos_token=bos, eos_token=tokenizer.decode([tokenizer.eos_id]))
    else:
        spans = cf.render(msgs, tools, thinking=thinking, add_generation_prompt=True)
    return cf.encode_spans(tokenizer, spans)[0]


def _held(buf: str, marker: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker`` (may still become it)."""
    for n in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-n:]):
            return n
    return 0


class OutputParser:
    """Generated text → reasoning / content / tool-call deltas (see the module docstring).

    ``feed(text)`` returns the deltas now decided; ``finish()`` the rest once generation ended. ``calls`` lists
    the tool calls parsed so far (a response with any has ``finish_reason: "tool_calls"``).
    """

    def __init__(self, thinking: bool = False, tools: bool = False, id_prefix: str | None = None) -> None:
        self.thinking = thinking
        self._stage = "reasoning" if thinking else "content"
        self._tools = tools
        self._buf = ""
        self._fresh = True  # no reasoning seen yet: a leading <think> is dropped
        self._begin_pending = False  # <｜tool▁calls▁begin｜> consumed but not yet justified by a parsed call
        self._prefix = id_prefix if id_prefix is not None else "call_" + secrets.token_hex(8)
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        return self._drain(final=True)

    # -- internals -------------------------------------------------------------------------------------------

    def _drain(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while self._step(out, final):
            pass
        merged: list[Delta] = []  # adjacent text of one kind → one delta
        for d in out:
            if d.kind != "tool_call" and not d.text:
                continue
            if merged and d.kind != "tool_call" and merged[-1].kind == d.kind:
                merged[-1] = Delta(d.kind, merged[-1].text + d.text)
            else:
                merged.append(d)
        return merged

    def _upto(self, marker: str, final: bool) -> tuple[str, bool]:
        """Take the buffer up to ``marker`` (consumed) → (text before, found); without it, everything that
        cannot be the start of the marker."""
        i = self._buf.find(marker)
        if i >= 0:
            text, self._buf = self._buf[:i], self._buf[i + len(marker):]
            return text, True
        keep = 0 if final else _held(self._buf, marker)
        text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return text, False

    def _content(self, out: list[Delta], text: str) -> None:
        if self._begin_pending:
            text, self._begin_pending = cf.CALLS_BEGIN + text, False
        out.append(Delta("content", text))

    def _step(self, out: list[Delta], final: bool) -> bool:
        """Consume what can be decided now; True while progress may continue."""
        if self._stage == "reasoning":
            if self._fresh:
                if not final and cf.THINK.startswith(self._buf) and self._buf != cf.THINK:
                    return False  # nothing yet, or maybe the start of <think>
                self._buf = self._buf.removeprefix(cf.THINK)
                self._fresh = False
            text, found = self._upto(cf.END_THINK, final)
            out.append(Delta("reasoning", text))
            if found:
                self._stage = "content"
            return found
        if self._stage == "content":
            if not self._tools:
                self._content(out, self._buf)
                self._buf = ""
                return False
            text, found = self._upto(cf.CALLS_BEGIN, final)
            self._content(out, text)
            if found:
                self._stage, self._begin_pending = "calls", True
            return found
        if self._stage == "calls":
            return self._step_calls(out, final)
        self._content(out, self._buf)  # "after": past the tool-call section, or given up on it
        self._buf = ""
        return False

    def _step_calls(self, out: list[Delta], final: bool) -> bool:
        s = self._buf.lstrip()
        if s.startswith(cf.CALL_BEGIN):
            j = s.find(cf.CALL_END)
            if j < 0:
                if final:  # the call never closed
                    self._give_up(out)
                return False
            raw, self._buf = s[:j + len(cf.CALL_END)], s[j + len(cf.CALL_END):]
            call = self._parse_call(s[len(cf.CALL_BEGIN):j])
            if call is None:
                self._content(out, raw)
            else:
                self._begin_pending = False
                self.calls.append(call)
                out.append(Delta("tool_call", call=call))
            return True
        if s.startswith(cf.CALLS_END):
            self._buf, self._stage = s[len(cf.CALLS_END):], "after"
            if not self.calls:  # nothing parsed in the section: its markup comes back verbatim
                self._content(out, cf.CALLS_END)
            return True
        if not s or (not final and (cf.CALL_BEGIN.startswith(s) or cf.CALLS_END.startswith(s))):
            return False
        self._give_up(out)
        return False

    def _give_up(self, out: list[Delta]) -> None:
        """Unparseable tool-call markup: the rest of the output is plain content."""
        self._content(out, self._buf)
        self._buf, self._stage = "", "after"

    def _parse_call(self, inner: str) -> ToolCall | None:
        name, sep, args = inner.partition(cf.TOOL_SEP)
        name, args = name.strip(), args.strip()
        if not sep or not name or any(m in name for m in cf.MARKERS) or any(c.isspace() for c in name):
            return None
        try:
            parsed = json.loads(args)
        except ValueError:
            return None
        if not isinstance(parsed, dict):
            return None
        i = len(self.calls)
        return ToolCall(i, f"{self._prefix}_{i}", name, args)


def parse(text: str, thinking: bool = False, tools: bool = False, id_prefix: str = "call") -> list[Delta]:
    """The whole generated ``text`` at once (what a non-streaming response holds)."""
    p = OutputParser(thinking, tools, id_prefix)
    return p.feed(text) + p.finish()


def message(deltas: Sequence[Delta], thinking: bool) -> dict[str, Any]:
    """A non-streaming response's ``message``: content (None when there are tool calls and no text),
    ``reasoning_content`` in thinking mode, ``tool_calls`` when the model called any."""
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [d.call.openai() for d in deltas if d.call is not None]
    msg: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if thinking:
        msg["reasoning_content"] = "".join(d.text for d in deltas if d.kind == "reasoning")
    if calls:
        msg["tool_calls"] = calls
    return msg


def finish_reason(reason: str, parser: OutputParser) -> str:
    """The engine's reason, or ``tool_calls`` when the model stopped after calling tools."""
    return "tool_calls" if reason == "stop" and parser.calls else reason
