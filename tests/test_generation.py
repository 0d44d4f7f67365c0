import pytest
import torch

import kiln
from kiln.generation import GenerationConfig, generate, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return kiln.Transformer(kiln.preset("tiny", initializer_range=0.3)).eval()


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    prompts = [[5, 6, 7], [9]]
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=12))
    assert (
        generate(model, prompts, GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))
        == greedy
    )
    assert (
        generate(model, prompts, GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3))
        == greedy
    )


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=11)
    first = generate(model, [[1, 2, 3]], config)
    assert first == generate(model, [[1, 2, 3]], config)
    other = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=20, temperature=1.0, seed=12))
    assert first != other


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    picked = sample_next(logits, GenerationConfig(temperature=1.0, top_k=2), generator)
    assert set(picked.tolist()) == {0, 1}
    # softmax mass of the top two is ~0.9; top_p=0.8 keeps exactly them.
    picked = sample_next(logits, GenerationConfig(temperature=1.0, top_p=0.8), generator)
    assert set(picked.tolist()) == {0, 1}


def test_stops_at_stop_token_and_streams(model):
    free = generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=10))[0]
    stop = free[3]
    streamed = []
    out = generate(
        model,
        [[5, 6, 7]],
        GenerationConfig(max_new_tokens=10, stop_token_ids=(stop,)),
        on_token=lambda i, t: streamed.append(t),
    )[0]
    assert out == free[: free.index(stop) + 1] == streamed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ],
)
def test_bad_generation_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], GenerationConfig())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1024\)"):
        generate(model, [[5000]], GenerationConfig())
