import numpy as np

from kiln.data.dedup import (
    DedupConfig,
    ExactDeduplicator,
    MinHasher,
    NearDeduplicator,
    content_hash,
    lsh_bands,
    shingle_hashes,
    word_shingles,
)

from .corpus import jaccard, with_substitutions, words


def test_exact_dedup_keeps_first():
    exact = ExactDeduplicator()
    assert not exact.is_duplicate(content_hash("the same text"))
    assert exact.is_duplicate(content_hash("the same text"))
    assert exact.is_duplicate(content_hash("  the same text\n"))  # surrounding whitespace is not content
    assert not exact.is_duplicate(content_hash("the same text!"))


def test_default_lsh_layout_is_documented_one():
    assert lsh_bands(128, 0.8) == (18, 7)


def test_shingle_hashes_match_reference_shingles():
    text = " ".join(words(300, seed=5))
    assert len(shingle_hashes(text, 5)) == len(word_shingles(text, 5))  # no 32-bit collisions at this size
    assert len(word_shingles("Only three words", 5)) == 1


def test_minhash_estimates_jaccard():
    base = words(400, seed=6)
    other = with_substitutions(base, 30, seed=1)
    a, b = " ".join(base), " ".join(other)
    true = jaccard(word_shingles(a, 5), word_shingles(b, 5))
    hasher = MinHasher(1024, seed=0)
    estimate = np.mean(hasher.signature(shingle_hashes(a, 5)) == hasher.signature(shingle_hashes(b, 5)))
    assert abs(estimate - true) < 0.05


def test_near_dedup_drops_above_threshold_and_keeps_below():
    config = DedupConfig()
    base = words(300, seed=7)
    near = with_substitutions(base, 3, seed=1)
    far = with_substitutions(base, 25, seed=2)
    base_text, near_text, far_text = (" ".join(w) for w in (base, near, far))
    near_jaccard = jaccard(word_shingles(base_text, 5), word_shingles(near_text, 5))
    far_jaccard = jaccard(word_shingles(base_text, 5), word_shingles(far_text, 5))
    assert near_jaccard > config.jaccard_threshold + 0.05, near_jaccard
    assert far_jaccard < config.jaccard_threshold - 0.2, far_jaccard

    dedup = NearDeduplicator(config)
    assert not dedup.is_duplicate(base_text)  # first occurrence is kept
    assert dedup.is_duplicate(near_text)
    assert not dedup.is_duplicate(far_text)
    assert dedup.is_duplicate(base_text.upper())  # shingles are case-folded
    assert not dedup.is_duplicate(" ".join(words(300, seed=8)))  # unrelated


def test_near_dedup_compares_against_kept_documents_only():
    dedup = NearDeduplicator(DedupConfig())
    base = words(300, seed=9)
    assert not dedup.is_duplicate(" ".join(base))
    for seed in range(20):
        assert dedup.is_duplicate(" ".join(with_substitutions(base, 2, seed=seed)))
    assert dedup._num_kept == 1
