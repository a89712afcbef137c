"""Ollama `Modelfile` next to an exported GGUF, so `ollama create NAME -f model-Q4_K_M.Modelfile` works.

The model's Jinja chat template (Hugging Face) is converted to Ollama's Go-template form where we know the
family's format: ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`, SmolLM2, Qwen) becomes

    {{- range .Messages }}<|im_start|>{{ .Role }}
    {{ .Content }}<|im_end|>
    {{ end }}<|im_start|>assistant

and a default system prompt that the Jinja template inserts when the first message is not a system message
becomes `SYSTEM` (Ollama prepends it in exactly that case). The end token(s) become `PARAMETER stop` lines.
For templates we do not convert, no TEMPLATE is written and Ollama picks one from the GGUF's
`tokenizer.chat_template` itself; the stop token is still written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edit2deploy.models import read_chat_template

CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)

_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\s*?\n([^'\"{}+]*?)<\|im_end\|>", re.DOTALL)


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_eos(model_dir: Path | str) -> str | None:
    return _token_text(_tokenizer_config(Path(model_dir)).get("eos_token"))


def _tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_chatml(template: str | None) -> bool:
    return bool(template) and "<|im_start|>" in template and "<|im_end|>" in template


def chatml_default_system(template: str) -> str | None:
    """The literal system prompt a ChatML template inserts when the conversation has none (SmolLM2 has one)."""
    m = _CHATML_SYSTEM.search(template)
    return m.group(1).strip() if m and m.group(1).strip() else None


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, chat_template: str | None, eos: str | None) -> str:
    """The Modelfile for `./gguf_name` given the model's Jinja chat template and end-of-sequence token."""
    lines = [
        "# Ollama Modelfile written by edit2deploy: ollama create NAME -f <this file>",
        f"FROM ./{gguf_name}",
    ]
    stops: list[str] = []
    if is_chatml(chat_template):
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
        system = chatml_default_system(chat_template or "")
        if system and '"""' not in system:
            lines.append(f'SYSTEM """{system}"""')
        stops += ["<|im_end|>", "<|im_start|>"]
    elif chat_template:
        lines.append(
            "# chat template: not converted here; Ollama derives one from the GGUF's tokenizer.chat_template"
        )
    if eos and eos not in stops:
        stops.insert(0, eos)
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    lines += ["PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def modelfile_for(gguf_name: str, model_dir: Path | str) -> str:
    """The Modelfile for a GGUF exported from `model_dir`."""
    return modelfile_text(gguf_name, read_chat_template(model_dir), read_eos(model_dir))
