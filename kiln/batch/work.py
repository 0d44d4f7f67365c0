"""RecordWork: what one claimed record asks of the engine (its prompts and sampling settings), and how
the engine's outputs become the record's result. Anything wrong with one record (a bad template, a prompt
too long, bad parameters) becomes that record's failure, never the chunk's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.batch import openai_format, tagging
from kiln.batch.backend import Backend
from kiln.batch.spec import JobSpec
from kiln.batch.store import ClaimedRecord, RecordResult
from kiln.batch.template import PromptTemplate
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import KilnError

GREEDY = SamplingParams(temperature=0.0)


@dataclass(kw_only=True, slots=True)
class RecordWork:
    record: ClaimedRecord
    prompts: list[list[int]] = field(default_factory=list)  # generation / scoring requests
    params: list[SamplingParams] = field(default_factory=list)
    embed_inputs: list[list[int]] = field(default_factory=list)  # /v1/embeddings requests
    # Builds the record's result from its requests' outputs (in order), or its embeddings.
    finish: Callable[[list], RecordResult] | None = None
    failure: RecordResult | None = None  # set when the record cannot run at all


class WorkBuilder:
    """Turns a job's claimed records into engine work, for one backend."""

    def __init__(self, spec: JobSpec, backend: Backend) -> None:
        self.spec = spec
        self.backend = backend
        self.template = PromptTemplate(spec.template) if spec.template else None
        self.label_ids = [backend.continuation_token_ids(spec.label_prefix + label) for label in spec.labels]

    def build(self, record: ClaimedRecord) -> RecordWork:
        work = RecordWork(record=record)
        try:
            if self.spec.kind == "openai":
                self._openai(work)
            elif self.spec.is_tagging:
                self._tagging(work)
            else:
                self._table_completion(work)
            for prompt, params in zip(work.prompts, work.params, strict=True):
                self.backend.check(prompt, params)
        except KilnError as error:
            work.failure = failure(record, str(error))
        return work

    def _tagging(self, work: RecordWork) -> None:
        prompt_ids = self.backend.prompt_token_ids(self.template.render(work.record.payload))
        work.prompts = tagging.label_prompts(prompt_ids, self.label_ids)
        work.params = [tagging.SCORING_PARAMS] * len(work.prompts)

        def finish(outputs: list[RequestOutput]) -> RecordResult:
            label, scores = tagging.best_label(self.spec.labels, outputs, len(prompt_ids))
            return RecordResult(
                record_index=work.record.record_index,
                custom_id=work.record.custom_id,
                output=label,
                response={"label": label, "scores": scores},
                num_prompt_tokens=len(prompt_ids),
                num_output_tokens=0,
            )

        work.finish = finish

    def _table_completion(self, work: RecordWork) -> None:
        prompt_ids = self.backend.prompt_token_ids(self.template.render(work.record.payload))
        work.prompts = [prompt_ids]
        work.params = [SamplingParams(temperature=0.0, max_tokens=self.spec.max_tokens)]

        def finish(outputs: list[RequestOutput]) -> RecordResult:
            sample = outputs[0].outputs[0]
            return RecordResult(
                record_index=work.record.record_index,
                custom_id=work.record.custom_id,
                output=sample.text,
                response={"text": sample.text, "finish_reason": sample.finish_reason},
                num_prompt_tokens=len(prompt_ids),
                num_output_tokens=len(sample.token_ids),
            )

        work.finish = finish

    def _openai(self, work: RecordWork) -> None:
        url, body = work.record.payload["url"], work.record.payload["body"]
        model = self.backend.model_name
        if url == "/v1/embeddings":
            work.embed_inputs = openai_format.embedding_inputs(body, self.backend)
            num_tokens = sum(len(ids) for ids in work.embed_inputs)

            def finish_embedding(vectors: list) -> RecordResult:
                response = openai_format.embedding_body(vectors, num_tokens, model)
                return self._result(work.record, None, response, num_tokens, 0)

            work.finish = finish_embedding
            return
        work.prompts = [openai_format.prompt_token_ids(url, body, self.backend)]
        work.params = [openai_format.sampling_params(body)]

        def finish(outputs: list[RequestOutput]) -> RecordResult:
            response = openai_format.completion_body(url, outputs[0], model)
            text = outputs[0].outputs[0].text
            tokens = response["usage"]
            return self._result(
                work.record, text, response, tokens["prompt_tokens"], tokens["completion_tokens"]
            )

        work.finish = finish

    @staticmethod
    def _result(record, output, response, num_prompt_tokens, num_output_tokens) -> RecordResult:
        return RecordResult(
            record_index=record.record_index,
            custom_id=record.custom_id,
            output=output,
            response=response,
            num_prompt_tokens=num_prompt_tokens,
            num_output_tokens=num_output_tokens,
        )


def failure(record: ClaimedRecord, reason: str) -> RecordResult:
    return RecordResult(record_index=record.record_index, custom_id=record.custom_id, error=reason)
