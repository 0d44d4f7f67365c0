"""The engine on the C++ CPU paged-attention backend (CppPagedAttention) generates transformers' greedy
tokens for every tiny HF family (BLOOM for ALiBi, Mistral for the sliding window).

KV blocks of 4 tokens put block boundaries mid-prompt, and a 24-token step budget splits the longer
prompts into chunks that attend their own cached context, sharing steps with decodes.
"""

import pytest

from kiln.kernels.cpu_extension import cpu_ops_available

if not cpu_ops_available():
    pytest.skip(
        "kiln's C++ CPU ops could not be built here (no C++ compiler, OpenMP or ninja)",
        allow_module_level=True,
    )

from kiln.engine import LLM, SamplingParams  # noqa: E402
from kiln.engine.cpu_attention import CppPagedAttention  # noqa: E402
from tests.engine.conftest import random_prompts  # noqa: E402
from tests.engine.test_parity import hf_greedy  # noqa: E402
from tests.hf_cases import CASE_NAMES, build_hf_model  # noqa: E402

PROMPT_LENGTHS = [1, 3, 4, 5, 9, 16, 17, 31, 40]
MAX_TOKENS = 10


class RecordingCppPagedAttention(CppPagedAttention):
    """CppPagedAttention that counts the kinds of sequence it is handed, to show the cases were run."""

    seen = {"decode": 0, "chunk over cached context": 0, "fresh prompt": 0}

    def __init__(self, pool, batch, config):
        super().__init__(pool, batch, config)
        for num_queries, length in zip(batch.query_lens, batch.context_lens, strict=True):
            kind = "decode" if num_queries == 1 else "fresh prompt" if num_queries == length else None
            self.seen[kind or "chunk over cached context"] += 1


@pytest.mark.parametrize("case", CASE_NAMES)
def test_cpp_backend_gives_the_transformers_greedy_tokens(case, tmp_path):
    hf = build_hf_model(case, tmp_path)
    prompts = random_prompts(PROMPT_LENGTHS, seed=2)
    expected = hf_greedy(hf, prompts, MAX_TOKENS)
    llm = LLM(tmp_path, block_size=4, max_num_batched_tokens=24, verbose=False)
    llm.engine.runner.attention = RecordingCppPagedAttention  # ModelRunner builds its backend per step
    RecordingCppPagedAttention.seen = dict.fromkeys(RecordingCppPagedAttention.seen, 0)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [output.outputs[0].token_ids for output in outputs] == expected
    assert all(RecordingCppPagedAttention.seen.values()), RecordingCppPagedAttention.seen
    assert llm.engine.kv_usage == 0
