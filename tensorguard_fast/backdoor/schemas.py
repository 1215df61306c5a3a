"""Which fields of a record are the prompt and the answer, and whether the record's text can be scored at all.

Schemas, tried in this order: a field mapping given by the user (prompt_field / answer_field); chat `messages`
({role, content}: the last assistant turn is the answer, everything before it the prompt); ShareGPT `conversations`
({from, value} with from = human / gpt / system ...); question/answer (also GradSentry's context/target);
prompt/response (or completion); instruction/input/output.
"""
from __future__ import annotations

import json
from typing import Any, Optional

# ShareGPT speaker names, as the common exports spell them, mapped to chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
PAIRS = (("question", "answer"), ("context", "target"), ("prompt", "response"), ("prompt", "completion"))
KNOWN = "question/answer, instruction/input/output, prompt/response, messages or conversations"


def answer_text(value) -> Optional[str]:
    """Text of a prompt or answer field: a list is joined with "; " (GradSentry's rule for list answers), an object
    becomes its JSON text, a number its decimal text; None stays None (no answer)."""
    if value is None:
        return None
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _chat(turns, key: str) -> tuple:
    """(prompt messages, answer, problem) of a chat list already in {role, content} form."""
    for k, m in enumerate(turns):
        if not isinstance(m.get("content"), str):
            return None, None, f"{key}[{k}] content is {type(m.get('content')).__name__}, not text"
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None:
        return None, None, f"'{key}' has no assistant turn to score"
    return turns[:last], turns[last]["content"], None


def _messages(msgs) -> tuple:
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
        return None, None, "'messages' is not a list of {role, content} objects"
    return _chat([{"role": m["role"], "content": m.get("content")} for m in msgs], "messages")


def _conversations(turns) -> tuple:
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t for t in turns):
        return None, None, "'conversations' is not a list of {from, value} objects (ShareGPT)"
    msgs = []
    for k, t in enumerate(turns):
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            return None, None, f"conversations[{k}] is from {t['from']!r}; known speakers: {sorted(SHAREGPT_ROLES)}"
        msgs.append({"role": role, "content": t.get("value")})
    return _chat(msgs, "conversations")


def split_record(record: Any, prompt_field: Optional[str] = None, answer_field: Optional[str] = None) -> tuple:
    """(prompt, answer, problem) of one record; prompt is a str or a list of chat messages, problem a short reason
    (None when the record has a prompt and an answer)."""
    if not isinstance(record, dict):
        return None, None, f"record is a {type(record).__name__}, not an object"
    if answer_field is not None:
        missing = [f for f in (prompt_field, answer_field) if f not in record]
        if missing:
            return None, None, f"no field {missing[0]!r} (mapped by --prompt-field/--answer-field)"
        prompt = record[prompt_field]
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
            return prompt, answer_text(record[answer_field]), None   # a mapped chat history
        return answer_text(prompt) or "", answer_text(record[answer_field]), None
    if "messages" in record:
        return _messages(record["messages"])
    if "conversations" in record:
        return _conversations(record["conversations"])
    for q, a in PAIRS:
        if q in record and a in record:
            return answer_text(record[q]) or "", answer_text(record[a]), None
    if "instruction" in record and "output" in record:
        prompt = answer_text(record["instruction"]) or ""
        extra = answer_text(record.get("input"))
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return prompt, answer_text(record["output"]), None
    return None, None, f"no known schema in keys {sorted(map(str, record))[:8]} (want {KNOWN}, or map fields " \
                       "with --prompt-field/--answer-field)"


def bad_text(value: Any) -> Optional[str]:
    """Why the strings of a record are not valid Unicode, or None. Undecodable input bytes (read with
    surrogateescape) show up as U+DC80..U+DCFF, JSON escapes of unpaired surrogates as any U+D800..U+DFFF; both
    would crash the tokenizer or the UTF-8 writer later. Walks iteratively: records may nest deeply."""
    stack = [value]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(x[exc.start])
                if 0xdc80 <= code <= 0xdcff:
                    return f"byte 0x{code - 0xdc00:02x} is not UTF-8 (or a lone surrogate \\u{code:04x})"
                return f"lone surrogate \\u{code:04x} is not valid Unicode"
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return None
