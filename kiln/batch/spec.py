"""JobSpec: what a batch job asks for each of its records, stored with the job as JSON."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from kiln.errors import KilnError

JobKind = Literal["openai", "table"]
OPENAI_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
DEFAULT_RESULTS_TABLE = "kiln_batch_results"
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(kw_only=True, slots=True)
class JobSpec:
    """A job's settings. `openai` jobs hold OpenAI batch requests ({custom_id, method, url, body}); `table`
    jobs hold records whose prompt is `template` (jinja2 over the record's columns), tagged with one of
    `labels` when given (each label's tokens scored after the prompt, the best taken) or else completed
    greedily up to `max_tokens`."""

    kind: JobKind
    model: str | None = None  # the model directory `kiln batch run` loads unless told another
    template: str | None = None
    id_column: str | None = None  # None: the record's line / row number
    labels: tuple[str, ...] = ()
    label_prefix: str = " "  # put between the prompt and each label when scoring it
    max_tokens: int = 16  # table jobs without labels
    results_table: str = DEFAULT_RESULTS_TABLE
    endpoint: str | None = None  # for the server's /v1/batches: the one endpoint every request must use
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        if self.kind not in ("openai", "table"):
            raise KilnError(f"job kind must be 'openai' or 'table', got {self.kind!r}")
        if self.kind == "table" and not self.template:
            raise KilnError("a table job needs a prompt template (--template 'Text: {{ text }}\\nLabel:')")
        if len(set(self.labels)) != len(self.labels) or any(not label for label in self.labels):
            raise KilnError(f"labels must be distinct and non-empty, got {list(self.labels)}")
        if len(self.labels) == 1:
            raise KilnError("tagging needs at least two labels to choose between")
        if self.max_tokens < 1:
            raise KilnError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not _TABLE_NAME.match(self.results_table):
            raise KilnError(
                f"results table {self.results_table!r} is not a plain SQL name (letters, digits, _)"
            )

    @property
    def is_tagging(self) -> bool:
        return bool(self.labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls(**json.loads(text))
