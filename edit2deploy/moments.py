"""Running float64 sums of key outer products, Σ k kᵀ, held as their upper block triangle.

Σ k kᵀ is symmetric, so only the blocks on and above the diagonal are summed: about half the memory of a full
d × d float64 sum (a 1.5B model's d_in = 5,632: 0.13 GiB instead of 0.24 per edited layer, while the corpus pass
holds every edited layer's sum) and half the products' arithmetic. Each block row's product is formed in float32
in a block × d buffer (not a d × d one) and added into the float64 sums: the values of a float32 product added in
float64, as a full product gives them.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 512  # rows per block: few enough Python steps per sequence, a small float32 buffer


class SymmetricSum:
    """Σ k kᵀ over the rows k of every `add`ed (tokens, d) matrix, as float64 block rows [r0:r1, r0:]."""

    def __init__(self, d: int, device: torch.device | str = "cpu", block_rows: int = BLOCK_ROWS):
        self.d = d
        self.starts = list(range(0, d, block_rows))
        self.rows = [
            torch.zeros(min(block_rows, d - r0), d - r0, dtype=torch.float64, device=device)
            for r0 in self.starts
        ]
        self._product = torch.empty(min(block_rows, d) * d, dtype=torch.float32, device=device)

    def add(self, k: torch.Tensor) -> None:
        """Add kᵀ k of `k` (tokens, d), float32."""
        for r0, row in zip(self.starts, self.rows, strict=True):
            out = self._product[: row.numel()].view(row.shape)
            row += torch.matmul(k[:, r0 : r0 + row.shape[0]].T, k[:, r0:], out=out)

    def block_rows(self) -> list[torch.Tensor]:
        """The float64 block rows themselves (e.g. to sum them over processes in place)."""
        return self.rows

    def full(self) -> torch.Tensor:
        """The whole symmetric d × d sum; the block rows are released as they are copied into it."""
        device = self._product.device
        self._product = torch.empty(0, device=device)
        out = torch.empty(self.d, self.d, dtype=torch.float64, device=device)
        for r0 in self.starts:
            row = self.rows.pop(0)
            r1 = r0 + row.shape[0]
            out[r0:r1, r0:] = row
            out[r1:, r0:r1] = row[:, r1 - r0 :].T
        return out
