from pathlib import Path

import pytest

from kiln.tokenizer_training import train_bpe_from_iterator

from .corpus import prose


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE (vocab 400) trained on the test corpus, saved once per session."""
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe_from_iterator((prose(100, seed) for seed in range(50)), 400, directory, show_progress=False)
    return directory
