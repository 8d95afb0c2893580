"""Whether a chat template renders tools, and the Hermes-style text rendering for those that do not.

transformers passes `tools=` and the messages' `tool_calls` / `tool` turns to the chat
template, but a template without tool support silently drops them: the model would be
trained on conversations with the calls missing. So every example that uses tools is
checked against a probe render first (`finesmith.data.tokenize.template_renders_tools`),
and refused with one line when the template ignores them, unless the user chose
`tool_format: hermes`.

`tool_format: hermes` prepends a small Jinja prelude to the model's own template. The
prelude rewrites the conversation into plain turns before the template runs, in the
format of the Hermes/Qwen function-calling models:

- the function schemas go into the system message (one JSON object per line inside
  `<tools></tools>`, with an instruction to answer calls inside `<tool_call>` tags);
- an assistant turn's calls become its text: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  (after its text, if any; one block per call);
- tool results become one user turn: `<tool_response>\\n...\\n</tool_response>` per result.

The prelude is part of the tokenizer's chat template, so the run folder's saved tokenizer
carries it and evaluation, chat, serving and exports render exactly as training did.
"""

from __future__ import annotations

from typing import Any

from finesmith.config import TOOL_FORMATS
from finesmith.data.tokenize import require_tool_support, template_renders_tools, uses_tools
from finesmith.errors import FinesmithError

HERMES_MARKER = "{#- finesmith tool_format: hermes -#}"
HERMES_PRELUDE = HERMES_MARKER + r"""
{%- set ns = namespace(out=[], results=[], tool_text='') -%}
{%- if tools -%}
{%- for t in tools -%}{%- set ns.tool_text = ns.tool_text + '\n' + (t | tojson) -%}{%- endfor -%}
{%- set ns.tool_text = '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' + ns.tool_text + '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -%}
{%- endif -%}
{%- set ns.rest = messages -%}
{%- if ns.tool_text -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set ns.out = [{'role': 'system', 'content': messages[0]['content'] + '\n\n' + ns.tool_text}] -%}
{%- set ns.rest = messages[1:] -%}
{%- else -%}
{%- set ns.out = [{'role': 'system', 'content': ns.tool_text}] -%}
{%- endif -%}
{%- endif -%}
{%- for m in ns.rest -%}
{%- if m['role'] == 'tool' -%}
{%- set ns.results = ns.results + ['<tool_response>\n' + (m['content'] | string) + '\n</tool_response>'] -%}
{%- else -%}
{%- if ns.results -%}
{%- set ns.out = ns.out + [{'role': 'user', 'content': ns.results | join('\n')}] -%}
{%- set ns.results = [] -%}
{%- endif -%}
{%- if m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] -%}
{%- set ns.calls = [] -%}
{%- for c in m['tool_calls'] -%}
{%- set f = c['function'] if c['function'] is defined else c -%}
{%- set ns.calls = ns.calls + ['<tool_call>\n{"name": ' + (f['name'] | tojson) + ', "arguments": ' + (f['arguments'] | tojson) + '}\n</tool_call>'] -%}
{%- endfor -%}
{%- set ns.out = ns.out + [{'role': 'assistant', 'content': ((m['content'] + '\n') if m['content'] else '') + (ns.calls | join('\n'))}] -%}
{%- else -%}
{%- set ns.out = ns.out + [{'role': m['role'], 'content': m['content']}] -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.results -%}
{%- set ns.out = ns.out + [{'role': 'user', 'content': ns.results | join('\n')}] -%}
{%- endif -%}
{%- set messages = ns.out -%}
{%- set tools = none -%}
"""
def install_tool_format(tokenizer: Any, tool_format: str) -> bool:
    """Apply `tool_format` to the tokenizer; True when the Hermes prelude was installed.

    `template` keeps the model's template (examples with tools then need one that renders
    them). `hermes` installs the text rendering when the template cannot render tools
    itself; a template that can is kept as it is.
    """
    if tool_format not in TOOL_FORMATS:
        raise FinesmithError(f"unknown tool_format '{tool_format}'; use one of {', '.join(TOOL_FORMATS)}")
    template = getattr(tokenizer, "chat_template", None) or ""
    if tool_format == "template" or template.startswith(HERMES_MARKER) or template_renders_tools(tokenizer):
        return False
    tokenizer.chat_template = HERMES_PRELUDE + template
    return True

__all__ = ["HERMES_PRELUDE", "install_tool_format", "require_tool_support", "template_renders_tools", "uses_tools"]
