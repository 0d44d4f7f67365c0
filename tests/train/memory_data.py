"""An in-memory stand-in for TokenLoader: windows of a token tensor, a pure function of (seed, step)."""

import torch


class MemoryData:
    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0, starts=None):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.starts = starts  # fixed window starts to cycle through, or None for random ones

    def batch(self, step: int):
        if self.starts is not None:
            picks = [
                self.starts[(step * self.batch_size + i) % len(self.starts)] for i in range(self.batch_size)
            ]
            starts = torch.tensor(picks)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            starts = torch.randint(
                0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=generator
            )
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state):
        assert state["seed"] == self.seed
