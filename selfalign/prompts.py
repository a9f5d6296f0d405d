"""Prompt templates: Jinja files in `prompts/`, one `{% block %}` per chat message.

A template has a `system` block (optional) and a `user` block; each block is rendered on its own, so
data inserted into one message can never open another (no role injection through the data). Rendering
is sandboxed (a template cannot reach Python internals) and strict (an unknown variable is an error).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from .errors import SelfalignError

ROLES = ("system", "user")


def _environment() -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                                trim_blocks=True, lstrip_blocks=True, autoescape=False)


@dataclass
class PromptTemplate:
    path: Path
    source: str
    template: jinja2.Template
    variables: frozenset[str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def render_messages(self, **variables) -> list[dict[str, str]]:
        messages = []
        for role in ROLES:
            block = self.template.blocks.get(role)
            if block is None:
                continue
            try:
                text = "".join(block(self.template.new_context(variables))).strip()
            except jinja2.exceptions.SecurityError as exc:
                raise TemplateError(f"{self.path}: the sandbox refused the template: {exc}; templates may use "
                                    "only the variables the stage provides") from None
            if text:
                messages.append({"role": role, "content": text})
        return messages


class TemplateError(SelfalignError):
    """A template that cannot be used; the CLI prints it without a traceback (exit 2)."""


def load_template(path: Path) -> PromptTemplate:
    source = path.read_text(encoding="utf-8")
    env = _environment()
    try:
        ast = env.parse(source)
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
    if "user" not in template.blocks:
        raise TemplateError(f"{path}: a prompt needs a {{% block user %}}...{{% endblock %}} "
                            "(and optionally a system block)")
    unknown_blocks = set(template.blocks) - set(ROLES)
    if unknown_blocks:
        raise TemplateError(f"{path}: unknown block(s) {sorted(unknown_blocks)}; use only {list(ROLES)}")
    for node in ast.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem)):
        # The sandbox would refuse these at render time, mid-run; refuse them before the run starts.
        name = node.attr if isinstance(node, jinja2.nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(name, str) and name.startswith("_"):
            raise TemplateError(f"{path}:{node.lineno}: the template reaches for {name!r}; templates may use "
                                "only the variables the stage provides and their public fields")
    return PromptTemplate(path=path, source=source, template=template,
                          variables=frozenset(meta.find_undeclared_variables(ast)))
