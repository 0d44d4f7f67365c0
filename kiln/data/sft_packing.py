"""Packed SFT batches: whole examples back to back in fixed-length rows, instead of one padded example a row.

`PackedSFTLoader.batch(step)` draws examples (seeded by (seed, step), like SFTLoader: resumable) and lays
them into rows of seq_len + 1 tokens in draw order, starting a new row when the next example does not
fit, until every data-parallel rank's rows are full; this rank takes its own. Each example keeps its EOS
separator, so the model side (kiln.train.document_attention) finds the documents from the token ids
alone and masks attention across them, with positions restarting per document. The rest of a row is EOS
padding. Targets: the next token where the loss mask marks it, IGNORE_INDEX elsewhere, and never across a
document boundary (a separator's next token is another document's first): the loss covers exactly the
tokens that padded, one-example-per-row training (SFTLoader) covers.
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.data.sft import IGNORE_INDEX, SFTLoader

_PACK_STREAM_TAG = 0x7061636B  # "pack": keeps these draws apart from SFTLoader's


class PackedSFTLoader(SFTLoader):
    """Batches (inputs, targets) (batch_size, seq_len) of packed examples; see the module docstring."""

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, _PACK_STREAM_TAG])
        capacity = self.seq_len + 1  # a row's inputs and its last target
        num_rows = self.batch_size * self.world_size
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
        used = 0
        while True:
            tokens, mask = self.examples[int(rng.integers(0, len(self.examples)))]
            size = min(len(tokens), capacity)  # an example longer than a row is cut, alone in its row
            if used + size > capacity:
                if len(rows) == num_rows:
                    break
                rows.append([])
                used = 0
            rows[-1].append((tokens[:size], mask[:size]))
            used += size
        return self.collate_packed(rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def collate_packed(
        self, rows: list[list[tuple[np.ndarray, np.ndarray]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of examples (tokens, mask), each row's total <= seq_len + 1 tokens -> (inputs, targets)."""
        inputs = torch.full((len(rows), self.seq_len), self.pad_token_id, dtype=torch.int64)
        targets = torch.full((len(rows), self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        for row, examples in enumerate(rows):
            tokens = torch.from_numpy(np.concatenate([t for t, _ in examples]).astype(np.int64))
            keep = torch.from_numpy(np.concatenate([m for _, m in examples]) != 0)
            n = len(tokens) - 1
            assert n <= self.seq_len, "a packed row holds at most seq_len + 1 tokens"
            inputs[row, :n] = tokens[:n]
            learned = keep[1:] & (tokens[:n] != self.pad_token_id)  # no target across a document end
            targets[row, :n] = tokens[1:].masked_fill(~learned, IGNORE_INDEX)
        return inputs, targets
