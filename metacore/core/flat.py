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


class FlatBuffer:
    """A zero-initialised flat copy of the shapes of ``like``, with one view per tensor."""

    def __init__(self, like: Sequence[torch.Tensor], dtype: Any = None) -> None:
        import torch

        like = list(like)
        self.device = like[0].device if like else torch.device("cpu")
        if dtype is None:
            dtype = torch.float32
            for t in like:
                dtype = torch.promote_types(dtype, t.dtype)
        self.offsets = [0]
        for t in like:
            self.offsets.append(self.offsets[-1] + t.numel())
        self.flat = torch.zeros(self.offsets[-1], dtype=dtype, device=self.device)
        self.views = [self.flat[a:b].view(t.shape) for a, b, t in zip(self.offsets, self.offsets[1:], like)]

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
