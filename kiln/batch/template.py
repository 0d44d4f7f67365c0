"""PromptTemplate: a jinja2 template over a record's columns, rendered in a sandbox."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.errors import KilnError

_ENVIRONMENT = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class PromptTemplate:
    def __init__(self, source: str) -> None:
        try:
            self.template = _ENVIRONMENT.from_string(source)
            self.columns = frozenset(meta.find_undeclared_variables(_ENVIRONMENT.parse(source)))
        except jinja2.TemplateSyntaxError as error:
            raise KilnError(
                f"the prompt template does not parse: {error.message} (line {error.lineno})"
            ) from error

    def check_columns(self, available: Iterable[str]) -> None:
        """Refuse a template naming a column no record has (a typo would otherwise fail every record)."""
        available = set(available)
        unknown = sorted(self.columns - available)
        if unknown:
            raise KilnError(
                f"the prompt template uses column(s) {', '.join(unknown)} that the input does not have "
                f"(its columns: {', '.join(sorted(available))})"
            )

    def render(self, record: Mapping[str, Any]) -> str:
        """The prompt for one record; a record the template cannot render raises KilnError (a per-record
        failure, e.g. a column missing from this one record)."""
        try:
            return self.template.render(**record)
        except jinja2.TemplateError as error:
            raise KilnError(f"bad template for this record: {error}") from error
