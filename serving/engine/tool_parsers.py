"""Which vLLM tool-call parser fits a model: read from its chat template, per release.

vLLM turns a model's tool-call text into OpenAI ``tool_calls`` only when started with
``--enable-auto-tool-choice --tool-call-parser NAME``, and the right NAME depends on how the
model's chat template writes tool calls. A release's ``tool_call_parser: auto`` (the default)
picks it here from the markers the template uses; a template with none of them gets no parser,
and the gateway answers requests with ``tools`` for that release with a clear 400 instead of
passing them to a server that would misread the model's output.
"""

from __future__ import annotations

import json
from pathlib import Path

# (marker in the chat template, vLLM parser): the first match wins, most specific first.
TEMPLATE_MARKERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("[TOOL_CALLS]",), "mistral"),
    (("<|python_tag|>",), "llama3_json"),
    (("<tool_call>", "</tool_call>"), "hermes"),
)


def chat_template(model_dir: str | Path) -> str | None:
    """The model folder's chat template text (``chat_template.jinja`` or the tokenizer config)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(errors="replace")
    try:
        tpl = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        tpl = "\n".join(t.get("template", "") for t in tpl if isinstance(t, dict))
    return tpl if isinstance(tpl, str) else None


def parser_for_template(template: str | None) -> str | None:
    """The vLLM tool-call parser for a chat template, or None when it has no tool-call format."""
    if not template:
        return None
    for markers, parser in TEMPLATE_MARKERS:
        if all(m in template for m in markers):
            return parser
    return None


def resolve_tool_parser(model_dir: str | Path, setting: str | None) -> str | None:
    """``setting`` as a parser name: 'auto' reads the template; None or 'none' means tools off."""
    if setting is None or setting == "none":
        return None
    if setting == "auto":
        return parser_for_template(chat_template(model_dir))
    return setting
