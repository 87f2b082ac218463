"""The order in which training problems are drawn."""

from __future__ import annotations

import torch

from reasonrl.data.problems import Problem


class ProblemStream:
    """Problems in a fresh seeded permutation each epoch; its whole state is one integer cursor."""

    def __init__(self, problems: list[Problem], seed: int, cursor: int = 0) -> None:
        self.problems, self.seed, self.cursor = problems, seed, cursor
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def take(self, n: int) -> list[Problem]:
        out = []
        for _ in range(n):
            epoch, pos = divmod(self.cursor, len(self.problems))
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(len(self.problems), generator=gen)
            out.append(self.problems[int(self._order[pos])])
            self.cursor += 1
        return out
