"""What the hypergradient controller keeps from one optimizer step to the next, bound to the optimizer's parameters.

θ before the last step and this step's gradient are the two rows of one ``(2, N)`` tensor (:mod:`metacore.core.flat`:
one fused copy each), so the learning rate's dot product and the two norms come from one matrix product over the
whole model. When momentum is adapted (or weight decay under Adam's coupled L2), one more copy holds the
optimizer's momentum buffer or Adam's first moment as it was before the step. Everything stays on the parameters'
device; a checkpoint holds θ before the step and that copy, per parameter tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from metacore.core.errors import ControllerError
from metacore.core.flat import FlatBuffer, flat_rows


class StepMemory:
    """θ before the last step (then, transiently, ``D = θ_s - θ_t``), this step's gradient, the momentum state."""

    def __init__(self, opt: Any, *, keep_momentum: bool) -> None:
        import torch

        self.params = [[p for p in g["params"] if p.requires_grad] for g in opt.param_groups]  # per optimizer group
        self.flat_params = [p for g in self.params for p in g]  # the same, in one list
        self.bounds: list[tuple[int, int]] = []  # each group's [start, stop) in the flat list
        start = 0
        for g in self.params:
            self.bounds.append((start, start + len(g)))
            start += len(g)
        self.device = next((p.device for p in self.flat_params), torch.device("cpu"))
        if any(p.device != self.device for p in self.flat_params):
            raise ControllerError("controller hypergrad: the model's parameters are on more than one device")
        self.pair = flat_rows(self.flat_params, 2)  # row 0: the gradient, row 1: θ before the step, then D
        self.grad = FlatBuffer(self.flat_params, flat=self.pair[0])
        self.prev = FlatBuffer(self.flat_params, flat=self.pair[1])
        self.prev_groups = [self.prev.views[a:b] for a, b in self.bounds]  # its views, per group
        # momentum buffer / first moment before the last step
        self.mom = [[torch.zeros_like(p) for p in g] for g in self.params] if keep_momentum else None

    def with_grads(self, grad_of: Callable[[Any], Any]) -> tuple[list, list, list]:
        """Per group: parameters that have a gradient this step, their gradients, their ``prev`` buffers."""
        params, grads, prevs = [], [], []
        for group, prev in zip(self.params, self.prev_groups, strict=True):
            ps, gs, bs = [], [], []
            for p, b in zip(group, prev, strict=True):
                g = grad_of(p)
                if g is not None:
                    ps.append(p)
                    gs.append(g)
                    bs.append(b)
            params.append(ps)
            grads.append(gs)
            prevs.append(bs)
        return params, grads, prevs

    def momentum_before(self, group: int, params: list[Any]) -> list[Any]:
        """The momentum copies of ``params`` (some of group ``group``'s parameters), in their order."""
        ids = {id(p) for p in params}
        return [b for p, b in zip(self.params[group], self.mom[group], strict=True) if id(p) in ids]

    def flat_gradient(self, grads: list[Any]) -> Any:
        """This step's gradient in the flat buffer (zeros where a parameter has none)."""
        import torch

        if all(g is not None for g in grads):
            return self.grad.copy_(grads).flat
        self.grad.flat.zero_()
        pairs = [(v, g) for v, g in zip(self.grad.views, grads, strict=True) if g is not None]
        if pairs:
            torch._foreach_copy_([v for v, _ in pairs], [g for _, g in pairs])
        return self.grad.flat

    def capture(self, opt: Any, family: str, had_buf: bool) -> bool:
        """Keep θ before this step (and the momentum state before it, when kept). Returns whether the step has SGD
        momentum buffers already (``had_buf`` as it was for an optimizer without them and no momentum copy)."""
        self.prev.copy_(self.flat_params)
        if self.mom is not None:
            key = "momentum_buffer" if family == "sgd" else "exp_avg"
            had = True
            for group, bufs in zip(self.params, self.mom, strict=True):
                for p, b in zip(group, bufs, strict=True):
                    src = opt.state.get(p, {}).get(key)
                    if src is None:
                        b.zero_()
                        had = False
                    else:
                        b.copy_(src)
            return had
        if family == "sgd":
            return all(opt.state.get(p, {}).get("momentum_buffer") is not None for p in self.flat_params)
        return had_buf

    def saved(self) -> tuple[list[Any], list[Any]]:
        """θ before the step and the momentum copies, per parameter tensor, for a checkpoint."""
        # views of a copy of the θ row alone: views of the buffer itself would drag the gradient row (the same
        # storage) into every checkpoint
        prev = list(FlatBuffer(self.flat_params, flat=self.prev.flat.clone()).views)
        mom = [t for group in self.mom for t in group] if self.mom is not None else []
        return prev, mom

    def load(self, state: Mapping[str, Any], have_prev: bool) -> None:
        """What :meth:`saved` returned (``state["prev"]``, ``state["mom"]``); a θ copy that does not fit the model is
        refused if the next step needs it (``have_prev``)."""
        prev, mom = list(state.get("prev", [])), list(state.get("mom", []))
        flat = self.flat_params
        if have_prev and len(prev) != len(flat):
            raise ControllerError(f"hypergrad state holds {len(prev)} parameter buffers, the model has {len(flat)}")
        if len(prev) == len(flat):
            for dst, src in zip(self.prev.views, prev, strict=True):
                dst.copy_(src)
        if self.mom is not None and len(mom) == len(flat):
            for dst, src in zip([t for g in self.mom for t in g], mom, strict=True):
                dst.copy_(src)
