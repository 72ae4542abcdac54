"""The built-in optimizers, registered through the same hook as a third party's."""

from __future__ import annotations

from metacore.core.hookspecs import hookimpl


@hookimpl
def metacore_register_optimizers(register):
    from metacore.optimizers import dadapt, distance_over_gradients, mechanic, prodigy, schedule_free, torch_optim

    for cls in (torch_optim.SGD, torch_optim.Adam, torch_optim.AdamW, dadapt.DAdaptSGD, dadapt.DAdaptAdam,
                prodigy.Prodigy, distance_over_gradients.DoG, distance_over_gradients.LDoG, mechanic.MechanicSGD,
                mechanic.MechanicAdamW, schedule_free.ScheduleFreeSGD, schedule_free.ScheduleFreeAdamW):
        register(cls)
