"""Exact dedup (content hash) and near dedup (MinHash + LSH), both keeping the first occurrence.

Near-duplicate rule: two documents are near-duplicates when the Jaccard similarity of their sets of
5-word shingles (lower-cased `\\w+` words) is at least 0.8, as estimated by the fraction of agreeing values
among 128 MinHash permutations (standard error <= 0.045). LSH only proposes candidates; every candidate is
verified against that estimate, so LSH false positives cost a comparison, not a document. The band layout
is the one with the most rows per band that still proposes a pair at exactly the threshold with probability
>= 0.95: for 128 permutations and 0.8 that is 18 bands x 7 rows, P(candidate) = 1 - (1 - J^7)^18, which is
0.986 at J = 0.8, 0.79 at J = 0.7, 0.40 at J = 0.6 and 0.13 at J = 0.5.

Hashes are stable across processes (crc32 + fixed mixing, seeded permutations), never Python's `hash`, so a
restarted run makes the same decisions.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

from kiln.errors import KilnError

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
DEDUP_REASONS = (EXACT_DUPLICATE, NEAR_DUPLICATE)

_WORD = re.compile(r"\w+")
_SHINGLE_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-64 prime: any odd constant mixes word positions
_SHINGLE_CHUNK = 4096  # bounds the (permutations, shingles) temporary to 128 x 4096 x 8 B = 4 MiB


@dataclass(kw_only=True, slots=True)
class DedupConfig:
    """Deduplication settings. Both passes keep the first occurrence in input order."""

    exact: bool = True
    """Drop documents whose stripped text is byte-identical to an earlier document's."""
    near: bool = True
    """Drop documents whose estimated shingle Jaccard with an earlier kept one is >= jaccard_threshold."""
    jaccard_threshold: float = 0.8
    """Jaccard similarity of word-shingle sets at or above which a document counts as a near-duplicate."""
    num_permutations: int = 128
    """MinHash signature length; the estimate's standard error is sqrt(J(1-J)/num_permutations)."""
    shingle_words: int = 5
    """Words per shingle; documents shorter than this form one shingle of all their words."""
    seed: int = 0
    """Seeds the MinHash permutations (fixed so that reruns decide identically)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.jaccard_threshold <= 1.0:
            raise KilnError(f"DedupConfig.jaccard_threshold must be in (0, 1], got {self.jaccard_threshold}.")
        if self.num_permutations < 1 or self.shingle_words < 1:
            raise KilnError("DedupConfig.num_permutations and shingle_words must be >= 1.")


def content_hash(text: str) -> bytes:
    """16-byte digest of the stripped text: the exact-dedup key and the train/val split key."""
    return hashlib.blake2b(text.strip().encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactDeduplicator:
    """Remembers content hashes of documents seen so far (~80 bytes per document)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, digest: bytes) -> bool:
        """True when `digest` was seen before; otherwise remembers it."""
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_shingles(text: str, size: int) -> set[str]:
    """The shingle set whose Jaccard similarity the near-dedup estimates (reference for tests)."""
    words = _words(text)
    span = min(size, len(words))
    return {" ".join(words[i : i + span]) for i in range(max(len(words) - size + 1, 1))} if words else set()


def _splitmix64(values: np.ndarray) -> np.ndarray:
    # Finalizer of splitmix64: spreads the polynomial combination over all 64 bits.
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """Unique 32-bit hashes of the word shingles of `text`, as uint64 (num_shingles,)."""
    words = _words(text)
    if not words:
        return np.empty(0, dtype=np.uint64)
    word_hashes = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    span = min(size, len(words))
    num_shingles = len(words) - span + 1
    combined = np.zeros(num_shingles, dtype=np.uint64)
    for offset in range(span):  # uint64 arithmetic wraps, which is what a polynomial hash wants
        combined = combined * _SHINGLE_MULTIPLIER + word_hashes[offset : offset + num_shingles]
    return np.unique(_splitmix64(combined) >> np.uint64(32))


class MinHasher:
    """MinHash with multiply-add-shift hashes h(x) = ((a x + b) mod 2^64) >> 32 over 32-bit keys x, with
    random 64-bit a (odd) and b: a 2-independent family (Dietzfelbinger 1996) that numpy's wrapping uint64
    arithmetic computes exactly. (A mod-prime family with a < 2^32 is monotone in x over most of its range,
    which biased the Jaccard estimate upward by ~0.2 in testing.)"""

    def __init__(self, num_permutations: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        top = np.iinfo(np.uint64).max
        self.a = rng.integers(0, top, size=(num_permutations, 1), dtype=np.uint64, endpoint=True) | np.uint64(
            1
        )
        self.b = rng.integers(0, top, size=(num_permutations, 1), dtype=np.uint64, endpoint=True)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """(num_permutations,) uint32 signature of a non-empty set of 32-bit hashes."""
        minimum = np.full(self.a.shape[0], np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, hashes.size, _SHINGLE_CHUNK):
            chunk = hashes[None, start : start + _SHINGLE_CHUNK]
            values = (self.a * chunk + self.b) >> np.uint64(32)  # (P, chunk)
            np.minimum(minimum, values.min(axis=1), out=minimum)
        return minimum.astype(np.uint32)


def lsh_bands(num_permutations: int, threshold: float, min_recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the most rows per band such that a pair at exactly `threshold` becomes a candidate
    with probability >= min_recall. More rows means fewer dissimilar candidates to verify."""
    for rows in range(num_permutations, 0, -1):
        bands = num_permutations // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= min_recall:
            return bands, rows
    return num_permutations, 1


class NearDeduplicator:
    """Streaming MinHash-LSH index over kept documents. Memory is ~2.8 KB per kept document at the defaults
    (a 512-byte signature plus 18 bucket entries in a dict): 270 MB measured for 95k kept documents."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self.hasher = MinHasher(config.num_permutations, config.seed)
        self.bands, self.rows = lsh_bands(config.num_permutations, config.jaccard_threshold)
        rng = np.random.default_rng(config.seed + 1)
        self._row_multipliers = rng.integers(1, 1 << 63, size=(1, self.rows), dtype=np.uint64) | np.uint64(1)
        self._band_salts = rng.integers(0, 1 << 63, size=self.bands, dtype=np.uint64)
        self._buckets: dict[int, int | list[int]] = {}
        self._signatures = np.empty((1024, config.num_permutations), dtype=np.uint32)
        self._num_kept = 0

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        banded = signature[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        # Salting by band keeps equal rows in different bands from sharing a bucket.
        return _splitmix64((banded * self._row_multipliers).sum(axis=1) + self._band_salts).tolist()

    def _candidates(self, keys: list[int]) -> set[int]:
        found: set[int] = set()
        for key in keys:
            holders = self._buckets.get(key)
            if holders is not None:
                found.update(holders if isinstance(holders, list) else (holders,))
        return found

    def _remember(self, signature: np.ndarray, keys: list[int]) -> None:
        if self._num_kept == self._signatures.shape[0]:
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        index = self._num_kept
        self._signatures[index] = signature
        self._num_kept += 1
        for key in keys:
            holders = self._buckets.setdefault(key, index)
            if holders != index:
                if isinstance(holders, list):
                    holders.append(index)
                else:
                    self._buckets[key] = [holders, index]

    def is_duplicate(self, text: str) -> bool:
        """True when `text` is a near-duplicate of an earlier kept document; otherwise indexes it.
        Texts without any word are never near-duplicates (exact dedup still sees them)."""
        hashes = shingle_hashes(text, self.config.shingle_words)
        if hashes.size == 0:
            return False
        signature = self.hasher.signature(hashes)
        keys = self._band_keys(signature)
        candidates = self._candidates(keys)
        if candidates:
            agreement = (self._signatures[sorted(candidates)] == signature).mean(axis=1)
            if agreement.max() >= self.config.jaccard_threshold:
                return True
        self._remember(signature, keys)
        return False
