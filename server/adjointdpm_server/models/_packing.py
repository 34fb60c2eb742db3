"""One ``cond`` tensor for models conditioned on token embeddings *and* a vector (docs/design.md §4.2).

SDXL, SD3 and FLUX take per-token text embeddings (L, D) and a pooled vector (P,) — plus, for
FLUX, the guidance scale. The solvers, the engine's batching and the wire format all carry one
``cond`` tensor per sample, so the two travel together: the tokens' L rows, then the vector
written row-major into ⌈P/D⌉ more rows, zero-padded. Differentiating w.r.t. the packed ``cond``
gives every encoder's output its gradient; the padding's gradient is zero.
"""

from __future__ import annotations

import torch

__all__ = ["TokensAndVector"]


class TokensAndVector:
    """The layout of ``cond`` = [tokens (L, D); vector (P,) in ⌈P/D⌉ zero-padded rows]."""

    def __init__(self, tokens: int, width: int, vector: int):
        if min(tokens, width, vector) < 1:
            raise ValueError(f"a packed cond needs positive sizes; got L={tokens}, D={width}, P={vector}")
        self.tokens, self.width, self.vector = tokens, width, vector
        self.rows = tokens + -(-vector // width)

    @property
    def shape(self) -> tuple[int, int]:
        """One sample's ``cond``: (L + ⌈P/D⌉, D)."""
        return (self.rows, self.width)

    def pack(self, tokens: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """(B, L, D) and (B, P) → (B, rows, D)."""
        batch = tokens.shape[0]
        if tuple(tokens.shape[1:]) != (self.tokens, self.width) or tuple(vector.shape) != (batch, self.vector):
            raise ValueError(f"cannot pack tokens {tuple(tokens.shape)} and vector {tuple(vector.shape)} "
                             f"as (B, {self.tokens}, {self.width}) + (B, {self.vector})")
        pad = (self.rows - self.tokens) * self.width - self.vector
        tail = torch.nn.functional.pad(vector.to(tokens.dtype), (0, pad))
        return torch.cat([tokens, tail.reshape(batch, -1, self.width)], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, rows, D) → tokens (B, L, D) and vector (B, P), as views."""
        tokens = cond[:, :self.tokens]
        vector = cond[:, self.tokens:].flatten(1)[:, :self.vector]
        return tokens, vector
