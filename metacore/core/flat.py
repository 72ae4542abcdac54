"""Flat buffers: one contiguous tensor that mirrors a list of tensors (a model's parameters or gradients).

A per-step statistic over a whole model (a dot product of the gradient with the last update, a norm) costs one
kernel per parameter tensor when it is computed on the list; on a CPU, for models of a few million parameters in
tens of tensors, that dispatch costs more than the arithmetic. Copied once into a flat buffer (one fused
``torch._foreach_copy_``), the same statistic is one kernel over one vector. The buffer's per-tensor ``views`` are
ordinary tensors, so code that works tensor by tensor keeps working on them.

All tensors mirrored by one buffer live on one device; the buffer's dtype is at least float32 (half-precision
parameters are mirrored in float32, float64 stays float64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch


def flat_dtype(like: Sequence[torch.Tensor]) -> Any:
    """The dtype a flat mirror of ``like`` uses: float32, or wider when a tensor is wider."""
    import torch

    dtype = torch.float32
    for t in like:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def flat_rows(like: Sequence[torch.Tensor], rows: int, dtype: Any = None) -> torch.Tensor:
    """A zero ``(rows, numel)`` tensor whose rows can each back a :class:`FlatBuffer` of ``like``: statistics of
    several mirrors then come from one matrix product (``rows @ rows.T``: every dot product in one pass)."""
    import torch

    like = list(like)
    device = like[0].device if like else torch.device("cpu")
    return torch.zeros(rows, sum(t.numel() for t in like), dtype=dtype or flat_dtype(like), device=device)


def gram_matrix(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rows.T`` (every pairwise dot product of the rows) in full float32 precision.

    On a CPU one matrix product reads the rows once. On a GPU a float32 matrix product may run in TF32 (10-bit
    mantissa) when the user allowed it (``torch.set_float32_matmul_precision("high")``), which would blur the
    dot products a hypergradient is made of; there the pairwise ``torch.dot``s are exact and memory bandwidth is
    plentiful.
    """
    import torch

    if rows.device.type == "cpu":
        return rows @ rows.T
    k = rows.shape[0]
    return torch.stack([torch.stack([torch.dot(rows[i], rows[j]) for j in range(k)]) for i in range(k)])


class FlatBuffer:
    """A zero-initialised flat copy of the shapes of ``like``, with one view per tensor (in ``flat`` when given: a
    1-D tensor of the right size, e.g. a row of :func:`flat_rows`)."""

    def __init__(self, like: Sequence[torch.Tensor], dtype: Any = None, flat: torch.Tensor | None = None) -> None:
        like = list(like)
        self.offsets = [0]
        for t in like:
            self.offsets.append(self.offsets[-1] + t.numel())
        if flat is None:
            flat = flat_rows(like, 1, dtype)[0]
        if flat.dim() != 1 or flat.numel() != self.offsets[-1]:
            raise ValueError(f"flat buffer of {flat.numel()} elements for tensors of {self.offsets[-1]}")
        self.flat = flat
        bounds = zip(self.offsets[:-1], self.offsets[1:], like, strict=True)
        self.views = [self.flat[a:b].view(t.shape) for a, b, t in bounds]

    def __len__(self) -> int:
        return len(self.views)

    def copy_(self, tensors: Sequence[torch.Tensor]) -> FlatBuffer:
        """Overwrite with ``tensors`` (same shapes, same order): one fused copy."""
        import torch

        torch._foreach_copy_(self.views, list(tensors))
        return self

    def sub_(self, tensors: Sequence[torch.Tensor]) -> FlatBuffer:
        """Subtract ``tensors`` in place (one fused pass)."""
        import torch

        torch._foreach_sub_(self.views, list(tensors))
        return self

    def segment(self, start: int, stop: int) -> torch.Tensor:
        """The flat slice that holds tensors ``start`` to ``stop - 1`` (e.g. one optimizer param group)."""
        return self.flat[self.offsets[start] : self.offsets[stop]]
