"""The DeepSeek-V3.1 chat layout (REFERENCE §11): OpenAI-style messages → text spans, for training and serving.

A conversation renders to a list of :class:`Span` ``(text, special, trained)``: ``special`` spans are the
layout's markers (tokenised with special-token parsing, so ``<｜User｜>`` is one id when the tokenizer has it),
the rest is message text (tokenised plainly: a message cannot inject a marker); ``trained`` marks what the
assistant produces — its reasoning, answer, tool calls and ``<｜end▁of▁sentence｜>`` — the loss mask of SFT.

    <｜begin▁of▁sentence｜>{system prompts joined by blank lines}[\\n\\n## Tools ...]
    <｜User｜>{text}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>             earlier turns: reasoning dropped
    <｜User｜>{text}<｜Assistant｜><think>{reasoning}</think>{answer}<｜end▁of▁sentence｜>     thinking, last turn
    <｜Assistant｜></think>{text?}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{args}<｜tool▁call▁end｜>…
        <｜tool▁calls▁end｜><｜end▁of▁sentence｜>
    <｜tool▁output▁begin｜>{result}<｜tool▁output▁end｜>{the assistant's reply follows directly}<｜end▁of▁sentence｜>

The generation prompt is ``<｜Assistant｜></think>`` (non-thinking) or ``<｜Assistant｜><think>`` (thinking), and
nothing after tool results. :func:`render_jinja` renders a checkpoint's own ``chat_template`` instead; its
trained spans are what each assistant turn adds to the rendered text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"
# Every marker of the layout (a tokenizer for chat should hold each as one special token).
MARKERS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP,
           OUTPUT_BEGIN, OUTPUT_END)
ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A message list does not fit the chat layout; the message says which message and why."""


class Span(NamedTuple):
    text: str
    special: bool  # a layout marker (tokenised with special-token parsing)
    trained: bool  # produced by the assistant: in the SFT loss


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, None (empty) or OpenAI content parts of type text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise ChatFormatError(f"{where}: only text content parts are supported, got {p!r}")
            parts.append(p["text"])
        return "".join(parts)
    raise ChatFormatError(f"{where}: content must be a string, null or a list of text parts, got {type(content).__name__}")


def _arguments(call: dict, where: str) -> tuple[str, str]:
    """(name, arguments JSON text) of one OpenAI tool call."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatFormatError(f"{where}: a tool call needs {{'function': {{'name': str, 'arguments': ...}}}}, "
                              f"got {call!r}")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):  # a JSON object given as such: render it compactly
        args = json.dumps(args, ensure_ascii=False)
    return fn["name"], args


def tools_prompt(tools: Sequence[dict]) -> str:
    """The system-prompt section that describes ``tools`` (OpenAI ``{"type": "function", "function": {...}}``)
    and the exact call format (REFERENCE §11)."""
    lines = ["## Tools", "You have access to the following tools:", ""]
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        lines += [f"### {fn['name']}", f"Description: {fn.get('description', '')}", "",
                  f"Parameters: {json.dumps(fn.get('parameters', {}), ensure_ascii=False)}", ""]
    lines += ["IMPORTANT: ALWAYS adhere to this exact format for tool use:",
              (f"{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments{CALL_END}"
              f"{{additional_tool_calls}}{CALLS_END}"), "",
              "Where:", "- `tool_call_name` must be an exact match to one of the available tools",
              "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema",
              "- For multiple tool calls, chain them directly without separators or spaces"]
    return "\n".join(lines)


def render(messages: Sequence[dict], tools: Sequence[dict] | None = None, thinking: bool = False,
           add_generation_prompt: bool = False) -> list[Span]:
    """``messages`` in the V3.1 layout. ``thinking``: the last assistant turn (or the generation prompt) opens
    with ``<think>`` and keeps its ``reasoning_content``; every other assistant turn drops its reasoning."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatFormatError(f"messages[{i}]: role must be one of {', '.join(ROLES)}, got "
                                  f"{m.get('role') if isinstance(m, dict) else m!r}")
    systems = [_text(m.get("content"), f"messages[{i}]") for i, m in enumerate(messages) if m["role"] == "system"]
    system = "\n\n".join(systems)
    if tools:
        system = (system + "\n\n" if system else "") + tools_prompt(tools)
    spans = [Span(BOS, True, False)]
    if system:
        spans.append(Span(system, False, False))
    last_asst = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    after_user = after_tool = False
    for i, m in enumerate(messages):
        where, role = f"messages[{i}]", m["role"]
        if role == "user":
            spans += [Span(USER, True, False), Span(_text(m.get("content"), where), False, False)]
            after_user, after_tool = True, False
        elif role == "tool":
            spans += [Span(OUTPUT_BEGIN, True, False), Span(_text(m.get("content"), where), False, False),
                      Span(OUTPUT_END, True, False)]
            after_user, after_tool = False, True
        elif role == "assistant":
            content = _text(m.get("content"), where)
            if END_THINK in content:  # reasoning written inline: the answer is what follows </think>
                inline, content = content.split(END_THINK, 1)
            else:
                inline = ""
            reasoning = m.get("reasoning_content") or inline.removeprefix(THINK)
            think = thinking and i == last_asst and not m.get("tool_calls")
            if after_user:  # after tool results the reply follows directly, without the assistant tag
                spans += [Span(ASSISTANT, True, False), Span(THINK if think else END_THINK, True, False)]
            if think:
                spans += [Span(reasoning, False, True), Span(END_THINK, True, True)]
            if content:
                spans.append(Span(content, False, True))
            if m.get("tool_calls"):
                spans.append(Span(CALLS_BEGIN, True, True))
                for j, call in enumerate(m["tool_calls"]):
                    name, args = _arguments(call, f"{where}.tool_calls[{j}]")
                    spans += [Span(CALL_BEGIN, True, True), Span(name, False, True), Span(TOOL_SEP, True, True),
                              Span(args, False, True), Span(CALL_END, True, True)]
                spans.append(Span(CALLS_END, True, True))
            spans.append(Span(EOS, True, True))
            after_user = after_tool = False
    if add_generation_prompt and after_user and not after_tool:
        spans += [Span(ASSISTANT, True, False), Span(THINK if thinking else END_THINK, True, False)]
    return [s for s in spans if s.text]


def render_text(spans: Sequence[Span]) -> str:
    return "".join(s.text for s in spans)


def encode_spans(tokenizer: Any, spans: Sequence[Span]) -> tuple[list[int], list[int]]:
    """Spans → (token ids, loss mask 0/1 per id): markers with special-token parsing, text plainly."""
    ids: list[int] = []
    mask: list[int] = []
    for s in spans:
        piece = tokenizer.encode(s.text, allow_special=s.special)
        ids += piece
        mask += [int(s.trained)] * len(piece)
    return ids, mask


def render_jinja(template: str, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                 thinking: bool = False, add_generation_prompt: bool = False, bos_token: str = BOS,
                 eos_token: str = EOS) -> list[Span]:
    """``messages`` through a checkpoint's jinja2 ``chat_template`` (HF ``tokenizer_config.json``). The text is
    one special-parsed span per piece; an assistant turn's trained span is what it adds to the rendering of the
    conversation before it with the generation prompt (the template's own assistant prefix stays untrained)."""
    import jinja2
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       loader=jinja2.BaseLoader())
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)

    def raise_exception(msg):
        raise ChatFormatError(f"chat template: {msg}")

    try:
        tpl = env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatFormatError(f"chat template does not parse: {e}") from None

    def one(msgs, gen: bool) -> str:
        kw = {"messages": list(msgs), "add_generation_prompt": gen, "thinking": thinking, "bos_token": bos_token,
                  "eos_token": eos_token, "raise_exception": raise_exception}
        if tools:
            kw["tools"] = list(tools)
        try:
            return tpl.render(**kw)
        except jinja2.TemplateError as e:
            raise ChatFormatError(f"chat template failed to render: {e}") from None

    full = one(messages, add_generation_prompt)
    spans: list[Span] = []
    done = 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt, upto = one(messages[:i], True), one(messages[:i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= done):
            raise ChatFormatError(f"chat template: the rendering of messages[:{i + 1}] is not a prefix of the whole "
                                  f"conversation's, so the assistant tokens cannot be located for the loss mask")
        spans += [Span(prompt[done:], True, False), Span(upto[len(prompt):], True, True)]
        done = len(upto)
    spans.append(Span(full[done:], True, False))
    return [s for s in spans if s.text]
