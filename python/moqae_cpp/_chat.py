# _chat.py — renders a GGUF's tokenizer.chat_template with Jinja2 the way Hugging Face transformers
# does (sandboxed, trim_blocks/lstrip_blocks, loop controls, tojson without ASCII escaping,
# raise_exception, strftime_now), and converts completion dicts to the chat.completion shapes of
# llama-cpp-python / the OpenAI API. No tokenization or generation here.
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterator


class ChatTemplate:
    def __init__(self, template: str, *, bos_token: str, eos_token: str):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        self._template = env.from_string(template)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        def raise_exception(message: str):
            raise ValueError(f"chat template: {message}")

        return self._template.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                     add_generation_prompt=add_generation_prompt,
                                     raise_exception=raise_exception,
                                     strftime_now=lambda fmt: datetime.now().strftime(fmt), **extra)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _chat_logprobs(lp: dict | None) -> dict | None:
    """Completion logprobs {tokens, token_logprobs, top_logprobs} -> chat {content: [...]}."""
    if lp is None:
        return None
    content = []
    for tok, tlp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        if tlp is None:
            continue
        content.append({
            "token": tok,
            "bytes": None,
            "logprob": tlp,
            "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in (top or {}).items()],
        })
    return {"content": content, "refusal": None}


def completion_to_chat(c: dict) -> dict:
    ch = c["choices"][0]
    return {
        "id": "chat" + c["id"],
        "object": "chat.completion",
        "created": c["created"],
        "model": c["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": ch["text"]},
            "logprobs": _chat_logprobs(ch["logprobs"]),
            "finish_reason": ch["finish_reason"],
        }],
        "usage": c["usage"],
    }


def chunks_to_chat(chunks: Iterator[dict]) -> Iterator[dict]:
    """Completion chunks -> chat.completion.chunk: a first chunk with the role, then content deltas,
    then an empty delta carrying finish_reason."""
    first = True
    for c in chunks:
        head = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"],
                "object": "chat.completion.chunk"}
        ch = c["choices"][0]
        if first:
            first = False
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        delta = {"content": ch["text"]} if ch["finish_reason"] is None else {}
        yield {**head, "choices": [{"index": 0, "delta": delta, "logprobs": _chat_logprobs(ch["logprobs"]),
                                    "finish_reason": ch["finish_reason"]}]}
