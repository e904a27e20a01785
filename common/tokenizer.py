"""Tokenizer and chat template of a checkpoint, without transformers at run time.

Loads `tokenizer.json` with the `tokenizers` library and renders the checkpoint's chat template
(`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) with jinja2 configured the
way transformers' `apply_chat_template` configures it (sandboxed, trim_blocks, lstrip_blocks,
loopcontrols, `raise_exception`, a non-escaping `tojson`), so prompts come out byte-identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise ValueError(f"{model_dir}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        config_path = d / "tokenizer_config.json"
        self.config: dict[str, Any] = (
            json.loads(config_path.read_text()) if config_path.is_file() else {}
        )
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif isinstance(self.config.get("chat_template"), str):
            template = self.config["chat_template"]
        self._template = _compile(template) if template else None
        self.eos_token_ids = _eos_ids(d, self)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer has no token {token!r}")
        return int(tid)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text, as transformers' `apply_chat_template` renders it: `tools` (OpenAI's
        tool objects) and extra template variables (`chat_template_kwargs`, e.g.
        `enable_thinking`) are passed to the template as they are."""
        if self._template is None:
            raise ValueError("this checkpoint has no chat template")
        special = {
            k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)
        }
        try:
            return str(
                self._template.render(
                    **{**special, **kwargs},
                    messages=messages,
                    tools=tools,
                    add_generation_prompt=add_generation_prompt,
                )
            )
        except (jinja2.TemplateError, TypeError, AttributeError, LookupError) as e:
            # Also what the template makes of odd values the client passed it (tools, kwargs).
            raise ValueError(f"chat template rejected the messages: {e}") from e


def _compile(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _eos_ids(model_dir: Path, tok: ChatTokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json first (it lists every stop id), else the
    tokenizer's eos_token."""
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        if isinstance(value, int):
            return (value,)
        if isinstance(value, list) and value:
            return tuple(int(v) for v in value)
    eos = tok.config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return (tok.token_id(eos),) if isinstance(eos, str) else ()
