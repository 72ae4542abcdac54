"""What a training-framework callback needs besides the controller driver, with no framework imported.

A framework's own loop (Hugging Face ``Trainer``, Lightning) builds the optimizer and steps a learning-rate scheduler
after every optimizer step. A callback that lets a metacore controller set the hyperparameters therefore needs:

* :func:`optimizer_hparam_space`: the hyperparameters the optimizer's param groups expose, with defaults from the
  groups' initial values (there is no task to declare them);
* :class:`ScheduledGroups`: the ``write`` of the :class:`~metacore.core.driver.ControllerDriver` for param groups that a
  scheduler also writes. Before each step the scheduler's values are remembered and the controller's written
  (``schedule="override"``: the controller's rate as is; ``"scale"``: relative to its initial value, times the
  schedule's); after the step the scheduler's values go back, so its own (possibly recursive) schedule continues
  undisturbed. Groups keep their ratios to the first one, and a group that started at 0 while another did not (the
  no-decay group of biases and norms) stays at 0;
* :func:`make_controller`: a controller from a registered name, a class or an instance, with validated options.
"""

from __future__ import annotations

from typing import Any, Mapping

from metacore.core.controller import Controller
from metacore.core.errors import UsageError
from metacore.core.hparams import HParamSpace, HParamSpec

SCHEDULE_MODES = ("override", "scale")


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's optimizer)."""
    for attr in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, attr, None)
        if inner is not None and hasattr(inner, "param_groups"):
            return inner
    return optimizer


def optimizer_hparam_space(optimizer: Any, bounds: Mapping[str, tuple[float, float]] | None = None) -> HParamSpace:
    """The hyperparameters an optimizer's param groups expose, with defaults from the groups' initial values.

    ``lr`` (log scale, default bounds 1e-3x .. 100x the initial value), ``momentum`` (SGD, RMSprop), ``beta1`` (the
    first entry of ``betas``, Adam family) and ``weight_decay``. ``bounds`` overrides any of them by name.
    """
    bounds = dict(bounds or {})
    groups = inner_optimizer(optimizer).param_groups
    first = groups[0]
    specs: list[HParamSpec] = []
    lr0 = float(first.get("initial_lr", first["lr"]))
    if not lr0 > 0:
        raise UsageError(f"the optimizer's initial learning rate must be positive, got {lr0}")

    def spec(name: str, default: float, low: float, high: float, **kw: Any) -> HParamSpec:
        low, high = bounds.pop(name, (low, high))
        return HParamSpec(name, min(max(default, low), high), float(low), float(high), **kw)

    specs.append(spec("lr", lr0, lr0 * 1e-3, lr0 * 1e2, log=True, help="learning rate of every param group"))
    if "momentum" in first:
        specs.append(spec("momentum", float(first["momentum"]), 0.0, 0.999, help="momentum"))
    if "betas" in first:
        specs.append(spec("beta1", float(first["betas"][0]), 0.0, 0.999, group_key="betas", index=0,
                          help="first-moment decay of the Adam family"))
    if "weight_decay" in first:
        wd = max(float(g.get("weight_decay", 0.0)) for g in groups)
        specs.append(spec("weight_decay", wd, 0.0, max(1.0, wd), help="weight decay (groups started at 0 stay 0)"))
    if bounds:
        raise UsageError(f"bounds given for {', '.join(bounds)}, which the optimizer does not have "
                         f"(it has: {', '.join(s.name for s in specs)})")
    return HParamSpace(specs, owner="the Trainer's optimizer")


class ScheduledGroups:
    """A controller's values in an optimizer's param groups, around a scheduler that also writes the learning rate.

    Call :meth:`before_step` with the values in force right before the controller is asked (so a gradient observer
    sees, in the groups, the rate the previous step used), :meth:`write` (the driver's ``write``) when they change, and
    :meth:`after_step` right after ``optimizer.step()`` and before the scheduler's ``step()``.
    """

    def __init__(self, optimizer: Any, space: HParamSpace, schedule: str = "override") -> None:
        if schedule not in SCHEDULE_MODES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULE_MODES)}, got {schedule!r}")
        self.groups = inner_optimizer(optimizer).param_groups
        self.space, self.schedule = space, schedule
        keys = {s.key for s in space if s.acts_on == "optimizer"}
        self.initial = [{k: g.get("initial_lr", g["lr"]) if k == "lr" else g.get(k) for k in keys}
                        for g in self.groups]
        self.defaults = {s.name: s.default for s in space}
        self.scheduled: list[Any] = [g["lr"] for g in self.groups]  # the scheduler's values for this step

    def before_step(self, hparams: Mapping[str, Any]) -> None:
        """Remember the scheduler's values for this step, then put the controller's in force."""
        self.scheduled = [g["lr"] for g in self.groups]
        self.write(hparams)

    def after_step(self) -> None:
        """The scheduler continues from its own values."""
        for group, lr in zip(self.groups, self.scheduled, strict=True):
            group["lr"] = lr

    def write(self, hparams: Mapping[str, Any]) -> None:
        """Write ``hparams`` (any of the space's optimizer hyperparameters) into every param group that has them."""
        for name, value in hparams.items():
            spec = self.space[name]
            if spec.acts_on != "optimizer":
                continue
            ref = self.defaults[name]
            for i, group in enumerate(self.groups):
                if spec.key not in group:
                    continue
                if name == "lr" or spec.key == "lr":
                    base = self.scheduled[i] if self.schedule == "scale" else self.initial[i]["lr"]
                    group["lr"] = value * (base / ref) if base != ref else value
                    continue
                initial = self.initial[i].get(spec.key)
                if spec.index is not None:
                    initial = initial[spec.index] if initial is not None else None
                new = value
                if initial is not None and ref != 0:
                    ratio = float(initial) / ref
                    new = value if ratio == 1.0 else value * ratio
                elif initial == 0 and any(init.get(spec.key) for init in self.initial):
                    new = 0.0  # a group that started at 0 while others did not (no-decay group) stays at 0
                spec.write(group, new)


def make_controller(controller: Any, options: Mapping[str, Any], registry: Any = None) -> Controller:
    """A controller from a registered name, a :class:`Controller` subclass or an instance; options validated."""
    if isinstance(controller, Controller):
        if options:
            raise UsageError("options are given to a controller instance; pass them to its constructor instead")
        return controller
    if isinstance(controller, type) and issubclass(controller, Controller):
        return controller(**options)
    if isinstance(controller, str):
        if registry is None:
            from metacore.core.registry import load_registry

            registry = load_registry()
        return registry.controller(controller).obj(**options)
    raise UsageError(f"controller must be a registered name, a Controller subclass or instance; got {controller!r}")
