"""Prompt tuning's virtual tokens sit at the same positions in training, offline greedy decoding and the
engine: what the trainer's loss scores is what generation produces (no off-by-one in how they are served)."""

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln import SamplingParams
from kiln.finetune import PromptTuningConfig, apply_prompt_tuning, save_adapter
from kiln.finetune.evaluation import greedy_completion
from kiln.train.objective import LanguageModelObjective
from tests.hf_cases import build_text_model


@pytest.mark.slow  # the engine starts: about a minute on 2 shared cores
def test_greedy_decode_equals_teacher_forced_argmax_and_the_engine(tmp_path):
    base = build_text_model(tmp_path / "base")
    model = apply_prompt_tuning(kiln.load_model(base), PromptTuningConfig(num_virtual_tokens=5), seed=3)
    with torch.no_grad():
        model.prompt.mul_(3.0)  # a prompt that clearly changes the outputs
    model.eval()
    prompts = [[5, 17, 99, 3, 250], [7, 8, 9, 10, 11, 12, 13, 44]]
    for prompt in prompts:
        reply = greedy_completion(model, prompt, stop_ids=set(), max_new_tokens=8)
        ids = torch.tensor([prompt + reply])
        # teacher forcing: one forward over prompt + reply predicts every reply token
        logits = model(ids)[0]
        assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == reply
        # the training objective (hidden states -> fused LM head + cross-entropy) scores the same logits
        targets = torch.full_like(ids, -100)
        targets[0, len(prompt) - 1 : -1] = torch.tensor(reply)
        loss = LanguageModelObjective(model)(ids, targets)
        expected = F.cross_entropy(logits, targets[0], ignore_index=-100)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # the engine, with the adapter saved in the PEFT format, generates the same tokens
    adapter = save_adapter(model, tmp_path / "prompt", base_model=str(base))
    llm = kiln.LLM(base, adapters={"p": adapter}, kv_cache_memory="16MB", verbose=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, adapter="p")
    outputs = llm.generate(prompts, [params] * len(prompts))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.outputs[0].token_ids == greedy_completion(model, prompt, set(), 8)
