"""``autolr``: find the learning rate in the run itself, then anneal it to the end of the budget.

A one-step hypergradient is greedy: on a BatchNorm ResNet it settles at rates tens of times smaller than the best
fixed rate (docs/results.md). ``autolr`` treats the user's initial rate as a *hint of scale*, not a commitment:

1. **Search** (the first steps, at most ``search_frac`` of the budget): the rate starts at ``hint × start_factor``
   and grows geometrically every step, an LR range test run on the training trajectory itself (Smith 2017), so it
   costs no forward or backward pass beyond the run's own. The per-step loss is smoothed (bias-corrected EMA); the
   search stops when the smoothed loss rises ``rise`` above its minimum so far (or turns non-finite, or the rate
   reaches the task's upper bound, which counts as a rise). The weights at the smoothed minimum are kept in memory
   and restored. The peak rate is the smaller of the rate at the stop divided by ``backoff`` and where the loss was
   lowest: the rate at the minimum of the per-step search losses averaged over ``window`` steps either side (the EMA
   lags, and the rate grows every step, so its minimum falls several times past the rate where the loss was lowest),
   raised to ``edge / edge_backoff`` where that is larger — the edge being the first rate past that minimum whose
   average is ``edge_rise`` above it. On a curve flat until it turns up, noise places the minimum anywhere below the
   turn; the edge stays put. (Without a window, the rate in force when the kept weights were taken caps the peak.)
   A curve that has no edge and whose centred minimum lies within ``flat_z`` noise deviations of its first window is
   *flat*: the search taught nothing below the rates where the loss departs from its level (an AdamW transformer at
   chance loss for its whole 19-step search, imdb), so its minimum is noise. Its peak is the rate of the first step
   whose loss departs ``depart_z`` noise deviations from the median before it, divided by ``flat_backoff`` (the
   classical range-test reading: a decade below where the loss leaves its plateau), or the hint if none departs.
2. **Anneal**: hold the peak, then a cosine decay to ``min_factor × peak`` over the last ``decay_frac`` of the steps
   after the search, ending with the budget (``TrainingState.budget``) — a warmup-stable-decay shape (Hu et al. 2024;
   Hägele et al. 2024). At a fixed budget a decayed rate beats a constant one, and holding the peak before the decay
   beat a cosine over the whole remainder on cifar10 (docs/results.md).
3. **Layer rates** (plain SGD only): a weight followed by a normalisation (BatchNorm after a convolution) is
   scale-invariant, so its gradient is orthogonal to it and SGD turns it by about ``lr / ||w||²`` a step. With
   Kaiming initialisation ``||w||²`` is twice the layer's input channels, so on a ResNet the last stage turns 8-40
   times slower than the first, where Adam-family optimizers turn the wide layers *faster*. The weights whose
   gradient is orthogonal to them at the first step (``|cos| < layer_tol``) get a rate of ``lr × ||w₀||² / the
   median over them`` for the whole run (:class:`~metacore.core.controller.TensorRates`: the driver scales their
   updates), which evens out their turning rates; the search then finds the one rate for all of them. Every other
   parameter keeps ``lr``. Adaptive optimizers are left alone (``layer_rates`` applies to ``torch.optim.SGD``).
4. **Guard**: after the search, a smoothed loss that rises ``guard_rise`` above its minimum again halves the peak
   (once per ``guard_every`` steps); a trainer rollback halves it too.

Everything it needs is the loss of each step (``StepContext.loss``, read back only during the search, so a GPU
syncs only then); with no per-step loss (an integration that has none) the logged loss means are used instead.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping

from metacore.core.controller import Controller, StepContext
from metacore.core.errors import ControllerError
from metacore.core.hookspecs import hookimpl
from metacore.core.hparams import HParamSpace
from metacore.core.options import OptionSpec
from metacore.core.state import TrainingState

SEARCH, ANNEAL = "search", "anneal"


class AutoLRController(Controller):
    """An LR range test inside the run, then cosine annealing over the rest of the budget; no extra passes."""

    name = "autolr"
    description = "finds the rate in the run (live range test), then anneals it over the budget; no extra passes"
    options = {
        "start_factor": OptionSpec("start_factor", 1e-2, float, "the search starts at the initial lr times this",
                                   1e-8, 1.0),
        "decades": OptionSpec("decades", 8.0, float, "decades of growth the search can cover in search_frac of "
                              "the budget (sets the growth per step)", 0.5, 12.0),
        "search_frac": OptionSpec("search_frac", 0.15, float, "largest fraction of the budget the search may take",
                                  0.01, 0.9),
        "rise": OptionSpec("rise", 0.2, float, "the search stops when the smoothed loss exceeds its minimum by "
                           "this fraction", 0.01, 10.0),
        "backoff": OptionSpec("backoff", 10.0, float, "the peak rate is the rate where the search stopped "
                              "divided by this", 1.0, 1e4),
        "window": OptionSpec("window", 5, int, "the search's per-step losses are averaged over this many steps "
                             "either side (no lag); the peak is at most the rate at their minimum, or edge_lr / "
                             "edge_backoff where that is larger (0: off, the kept rate caps the peak instead)",
                             0, None),
        "edge_rise": OptionSpec("edge_rise", 0.1, float, "the edge is the first rate past the centred minimum whose "
                                "centred loss is this fraction above it (0: no edge)", 0.0, 10.0),
        "edge_backoff": OptionSpec("edge_backoff", 4.0, float, "a peak below edge_lr / edge_backoff is raised to it "
                                   "(the centred minimum of a flat curve lands anywhere in it)", 1.0, 1e4),
        "flat_z": OptionSpec("flat_z", 3.0, float, "a search curve with no edge whose centred minimum is less than "
                             "this many noise deviations (of a window's mean) below its first window is flat: its "
                             "minimum is noise (0: off)", 0.0, None),
        "depart_z": OptionSpec("depart_z", 6.0, float, "on a flat curve, the first step whose loss departs this many "
                               "noise deviations from the median of the steps before it marks the plateau's end",
                               0.5, None),
        "flat_backoff": OptionSpec("flat_backoff", 10.0, float, "on a flat curve the peak is the rate at the "
                                   "plateau's end divided by this", 1.0, 1e4),
        "smoothing": OptionSpec("smoothing", 0.9, float, "EMA factor of the per-step loss", 0.0, 0.999),
        "min_factor": OptionSpec("min_factor", 0.0, float, "final rate as a fraction of the peak", 0.0, 1.0),
        "decay_frac": OptionSpec("decay_frac", 0.3, float, "fraction of the steps after the search spent in the "
                                 "cosine decay; before it the peak is held (1: decay from the end of the search)",
                                 0.01, 1.0),
        "guard_rise": OptionSpec("guard_rise", 0.5, float, "after the search, a smoothed loss this fraction above "
                                 "its minimum halves the peak (0: off)", 0.0, None),
        "guard_every": OptionSpec("guard_every", 20, int, "steps between two guard cuts", 1, None),
        "layer_rates": OptionSpec("layer_rates", True, bool, "on torch.optim.SGD: scale-invariant weights (gradient "
                                  "orthogonal to the weight at the first step) get lr × ||w0||² / their median",
                                  None, None),
        "layer_power": OptionSpec("layer_power", 1.0, float, "layer rates are (||w0||² / their median) to this power "
                                  "(1: even turning rates)", 0.0, 4.0),
        "vector_factor": OptionSpec("vector_factor", 1.0, float, "while layer rates apply, one-dimensional parameters "
                                    "(normalisation scales and shifts, biases) get lr times this", 0.0, 100.0),
        "layer_tol": OptionSpec("layer_tol", 1e-3, float, "a weight whose |cos(gradient, weight)| at the first step "
                                "is below this counts as scale-invariant", 0.0, 1.0),
        "keep_every": OptionSpec("keep_every", 5, int, "during the search, the weights at a new loss minimum are "
                                 "kept at most every this many steps, and restored when the search stops on a rise "
                                 "(0: never)", 0, None),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._clear()

    def _clear(self) -> None:
        self.lr_name = ""
        self.phase = SEARCH
        self.lr = 0.0
        self.growth = 1.0
        self.peak = 0.0
        self.search_end = 0  # the step the search ended at
        self.stop_lr = 0.0
        self.ema = 0.0
        self.ema_n = 0
        self.ema_min = math.inf
        self.last_cut = -1
        self.cuts = 0
        self._smoothed = math.nan
        self._last_logged = math.nan
        self._last_step = -1
        self._loss: float | None = None
        self.curve_lr: list[float] = []  # during the search: the rate and the loss of each fed step
        self.curve_loss: list[float] = []
        self.centered_lr = 0.0
        self.edge_lr = 0.0
        self.flat_lr = 0.0  # a flat curve's peak: its plateau end / flat_backoff, or the hint; 0.0: not flat
        self.hint = 0.0
        self.kept_step = -1  # the step whose weights the trainer keeps for us
        self.kept_lr = 0.0
        self.went_back = 0
        self._request: str | None = None
        self.rates: list[float] | None = None  # per-tensor rate multipliers, fixed at the first step; [] for none

    def reset(self, hparams: Mapping[str, float], seed: int, space: HParamSpace, budget: int) -> None:
        super().reset(hparams, seed, space, budget)
        self._clear()
        names = [s.name for s in space if s.acts_on == "optimizer" and s.key == "lr"]
        if not names:
            raise ControllerError(f"controller autolr needs an optimizer learning rate in {space.owner}'s "
                                  "hyperparameters (a spec writing the param-group key 'lr')")
        self.lr_name = names[0]
        spec = space[self.lr_name]
        self.hint = hint = float(hparams[self.lr_name])
        self.lr = spec.clip(hint * self.config["start_factor"])
        steps = max(1.0, self.config["search_frac"] * max(1, budget))
        self.growth = 10.0 ** (self.config["decades"] / steps)

    # ------------------------------------------------------------------------------------------------ feedback
    def observe_gradients(self, ctx: StepContext) -> None:
        if ctx.loss is not None and self.phase == SEARCH:  # the one read-back, during the search only
            self._loss = float(ctx.loss)

    def tensor_rates(self, ctx: StepContext) -> list[float] | None:
        if self.rates is None:
            self.rates = self._layer_rates(ctx)
        return self.rates or None

    def _layer_rates(self, ctx: StepContext) -> list[float]:
        """``||w0||² / median`` for each scale-invariant weight of plain SGD, 1.0 for the rest; [] where none apply."""
        import torch

        if not self.config["layer_rates"] or not isinstance(ctx.optimizer, torch.optim.SGD):
            return []
        tol, squares = self.config["layer_tol"], {}
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(ctx.params, ctx.grads, strict=True)):
                if p.ndim < 2:
                    continue
                pn, gn = float(p.norm()), float(g.norm())
                if pn > 0 and gn > 0 and abs(float((p * g).sum())) / (pn * gn) < tol:
                    squares[i] = pn * pn
        if len(squares) < 2:
            return []
        median, power = statistics.median(squares.values()), self.config["layer_power"]
        vector = self.config["vector_factor"]
        return [(squares[i] / median) ** power if i in squares else vector if p.ndim == 1 else 1.0
                for i, p in enumerate(ctx.params)]

    def after_step(self, ctx: StepContext) -> None:
        request, self._request = self._request, None
        if request == "keep" and ctx.keep is not None:
            ctx.keep()
        elif request == "go_back" and ctx.go_back is not None and ctx.go_back():
            self.went_back += 1

    def _feed(self, value: float, steps: int = 1) -> None:
        """Fold a loss into the EMA; a logged mean covering ``steps`` steps weighs as those steps would."""
        if not math.isfinite(value):
            self.ema = math.inf
            return
        decay = self.config["smoothing"] ** max(1, steps)
        self.ema_n += max(1, steps)
        self.ema = decay * self.ema + (1 - decay) * value
        debias = 1 - self.config["smoothing"] ** self.ema_n
        self._smoothed = self.ema / debias if debias > 0 else value
        self.ema_min = min(self.ema_min, self._smoothed)

    def _current_loss(self, state: TrainingState) -> tuple[float, int] | None:
        """This step's loss if the integration gives it, else a newly logged loss mean (with the steps it covers)."""
        logged = None
        if state.train_losses and state.train_loss != self._last_logged:
            steps = state.step - self._last_step if self._last_step >= 0 else 1
            self._last_logged, self._last_step = state.train_loss, state.step
            logged = (state.train_loss, steps)
        if self._loss is not None:
            value, self._loss = self._loss, None
            return value, 1
        return logged

    # ------------------------------------------------------------------------------------------------ decisions
    def act(self, state: TrainingState) -> dict[str, Any]:
        spec = self.space[self.lr_name]
        value = self._current_loss(state)
        if self.phase == SEARCH:
            if value is not None:
                before = self.ema_min
                self._feed(*value)
                if math.isfinite(value[0]):  # with the rate it was taken at (a logged mean: its middle step's)
                    self.curve_lr.append(self.lr / self.growth ** (1 + (value[1] - 1) / 2))
                    self.curve_loss.append(value[0])
                every = self.config["keep_every"]
                if every and self.ema_min < before and state.step - self.kept_step >= every:
                    self._request, self.kept_step, self.kept_lr = "keep", state.step, self.lr
            risen = self.ema_n >= 10 and (not math.isfinite(self.ema)
                                         or self._smoothed > (1 + self.config["rise"]) * self.ema_min)
            out_of_room = self.lr >= spec.high
            too_long = state.step >= self.config["search_frac"] * max(1, state.budget)
            if risen or out_of_room or too_long:
                # the task's upper bound counts as a rise: a rate the task declares too large is past the good ones
                # (electricity's Adam reached lr=1 before its smoothed loss had turned up: test MAE 0.79)
                past = risen or out_of_room
                self.stop_lr = self.lr
                peak = self.lr / self.config["backoff"] if past else self.lr
                self.read_curve()
                if past:
                    peak = self.capped(peak)
                    if self.kept_step >= 0:
                        self._request = "go_back"  # undo what the steps past the minimum did to the weights
                self.peak = spec.clip(peak)
                self.phase, self.search_end = ANNEAL, state.step
                self.ema_min = self._smoothed
            else:
                lr = self.lr
                self.lr = spec.clip(self.lr * self.growth)
                return {self.lr_name: lr}
        elif value is not None and self.config["guard_rise"] > 0:
            self._feed(*value)
            if (self._smoothed > (1 + self.config["guard_rise"]) * self.ema_min
                    and state.step - self.last_cut >= self.config["guard_every"]):
                self.peak, self.last_cut, self.cuts = spec.clip(self.peak * 0.5), state.step, self.cuts + 1
                self.ema_min = self._smoothed
        self.lr = spec.clip(self._annealed(state.step, state.budget))
        return {self.lr_name: self.lr} if self.lr != state.hparams.get(self.lr_name) else {}

    def capped(self, peak: float) -> float:
        """``peak`` (the stop rate over ``backoff``) capped where the loss was lowest, from ``centered_lr`` and
        ``edge_lr`` or ``flat_lr`` (set by :meth:`read_curve` at the search's end; ``benchmarks/autolr_curves.py``
        replays recorded curves through it)."""
        if self.flat_lr > 0:  # a flat curve: its minimum is noise; a decade below the plateau's end (or the hint)
            return min(peak, self.flat_lr)
        if self.centered_lr > 0:
            # where the loss was lowest, without the EMA's lag; on a flat curve that minimum lands anywhere below the
            # rise, which stays put: a quarter of the rate where the loss has risen is kept
            lowest = self.centered_lr
            if self.edge_lr > 0:
                lowest = max(lowest, self.edge_lr / self.config["edge_backoff"])
            return min(peak, lowest)
        if self.kept_step >= 0:
            return min(peak, self.kept_lr)  # never above a rate the loss was still at its minimum with
        return peak

    def read_curve(self) -> None:
        """Read the search curve: ``centered_lr`` and ``edge_lr`` (:meth:`_centered_minimum_and_edge`), and
        ``flat_lr``, the peak where the curve is flat (:meth:`_plateau_end`)."""
        self.centered_lr, self.edge_lr = self._centered_minimum_and_edge()
        self.flat_lr = self._plateau_end() if self.edge_lr == 0.0 and self.centered_lr > 0 else 0.0

    def fall_deviations(self) -> float:
        """How far the centred minimum lies below the first whole window, in noise deviations of a window's mean
        (``nan`` where the curve is too short for whole windows to compare, ``inf`` on a noiseless curve).

        The noise is the step-to-step deviation, robustly: 1.4826 × the median absolute difference of consecutive
        losses / √2, so a few jumps at the end do not inflate it. A falling curve lies many deviations down:
        electricity's searches without an edge 5-11, imdb's seeds 1-2 from 2e-5 0.0-0.3 (docs/results.md)."""
        k, losses = self.config["window"], self.curve_loss
        n = len(losses)
        if k <= 0 or n <= 2 * k + 3 or self.centered_lr <= 0:
            return math.nan
        noise = self._noise()
        if noise <= 0:
            return math.inf
        at = self.curve_lr.index(self.centered_lr)
        return (self._window_mean(k) - self._window_mean(at)) / (noise / math.sqrt(2 * k + 1))

    def _noise(self) -> float:
        diffs = [abs(b - a) for a, b in zip(self.curve_loss, self.curve_loss[1:], strict=False)]
        return 1.4826 * statistics.median(diffs) / math.sqrt(2) if diffs else 0.0

    def _window_mean(self, i: int) -> float:
        """The search's losses averaged over ``window`` steps either side of step ``i`` (fewer at the ends)."""
        k, losses = self.config["window"], self.curve_loss
        lo, hi = max(0, i - k), min(len(losses), i + k + 1)
        return sum(losses[lo:hi]) / (hi - lo)

    def _plateau_end(self) -> float:
        """On a flat curve (no edge, and a centred minimum less than ``flat_z`` noise deviations of a window's mean
        below the first whole window, :meth:`fall_deviations`), the rate of the first step whose loss departs
        ``depart_z`` noise deviations from the median of the steps before it, over ``flat_backoff``; the hint where
        none departs; 0.0 on a curve that is not flat (or too short to tell)."""
        z, losses = self.config["flat_z"], self.curve_loss
        if z <= 0 or not self.fall_deviations() < z:
            return 0.0
        depart = self.config["depart_z"] * self._noise()
        end = next((i for i in range(3, len(losses)) if abs(losses[i] - statistics.median(losses[:i])) > depart), None)
        return self.curve_lr[end] / self.config["flat_backoff"] if end is not None else self.hint

    def _centered_minimum_and_edge(self) -> tuple[float, float]:
        """The rate at the minimum of the search's losses averaged over ``window`` steps either side, and the edge:
        the first rate past it whose average is ``edge_rise`` above that minimum (0.0 where there is none).

        The EMA that decides when to stop lags by about ``1 / (1 - smoothing)`` steps, and the rate grows every step,
        so the rate in force at the EMA's minimum (the kept copy) can be several times the rate where the loss was
        lowest; a centred average has no lag. Only steps with a whole window either side count when there are any:
        the truncated averages at the ends rest on a few noisy losses (electricity from 1e-2, seed 0: a minimum
        placed at the last step, 0.74, against 0.063 with whole windows only). On a valley that rises more steeply
        than it fell it leans to the gentle (lower-rate) side, by at most ``window`` growth steps.

        On a curve that is flat until it turns up (a BatchNorm ResNet in its first 80 steps: the loss falls from 2.4
        to 2.3 while the rate grows four decades) the minimum is placed by noise anywhere in those decades (cifar10:
        0.004 to 0.044 over 15 searches), while the edge stays within a factor of two (0.09 to 0.20)."""
        k, n, mean = self.config["window"], len(self.curve_loss), self._window_mean
        if k <= 0 or n < 2:
            return 0.0, 0.0
        whole = range(k, n - k) if n > 2 * k else range(n)  # only averages over a full window, where there are some
        at = min(whole, key=mean)
        rise = self.config["edge_rise"]
        edge = next((i for i in whole if i > at and mean(i) > (1 + rise) * mean(at)), None) if rise > 0 else None
        return self.curve_lr[at], (self.curve_lr[edge] if edge is not None else 0.0)

    def _annealed(self, step: int, budget: int) -> float:
        span = max(1, budget - self.search_end)
        hold = (1.0 - self.config["decay_frac"]) * span
        t = min(1.0, max(0.0, (step - self.search_end - hold) / max(1.0, span - hold)))
        lo = self.config["min_factor"]
        return self.peak * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t)))

    def on_rollback(self, hparams: Mapping[str, float]) -> None:
        """The trainer restored a snapshot after a divergence and halved the rate: end the search, halve the peak."""
        lr = float(hparams.get(self.lr_name, self.lr))
        if self.phase == SEARCH:
            self.phase, self.peak, self.stop_lr = ANNEAL, lr / self.config["backoff"] * 2, lr * 2
        else:
            self.peak *= 0.5
        self.cuts += 1

    def diagnostics(self) -> dict[str, float]:
        return {"autolr_peak": self.peak, "autolr_searching": float(self.phase == SEARCH),
                "autolr_stop_lr": self.stop_lr, "autolr_cuts": float(self.cuts), "autolr_kept_lr": self.kept_lr,
                "autolr_centered_lr": self.centered_lr, "autolr_edge_lr": self.edge_lr, "autolr_flat_lr": self.flat_lr,
                "autolr_went_back": float(self.went_back),
                "autolr_layer_tensors": float(sum(r != 1.0 for r in self.rates or []))}

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "lr": self.lr, "growth": self.growth, "peak": self.peak,
                "search_end": self.search_end, "stop_lr": self.stop_lr, "ema": self.ema, "ema_n": self.ema_n,
                "ema_min": self.ema_min, "smoothed": self._smoothed,
                "last_cut": self.last_cut, "cuts": self.cuts, "kept_step": self.kept_step, "kept_lr": self.kept_lr,
                "went_back": self.went_back, "curve_lr": list(self.curve_lr), "curve_loss": list(self.curve_loss),
                "centered_lr": self.centered_lr, "edge_lr": self.edge_lr, "flat_lr": self.flat_lr, "hint": self.hint,
                "request": self._request or "", "rates": None if self.rates is None else list(self.rates),
                "last_logged": self._last_logged, "last_step": self._last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.phase = str(state["phase"])
        for key in ("lr", "growth", "peak", "stop_lr", "ema", "ema_min"):
            setattr(self, key, float(state[key]))
        self._smoothed = float(state["smoothed"])
        self.search_end, self.ema_n = int(state["search_end"]), int(state["ema_n"])
        self.last_cut, self.cuts = int(state["last_cut"]), int(state["cuts"])
        self.kept_step, self.kept_lr = int(state.get("kept_step", -1)), float(state.get("kept_lr", 0.0))
        self.went_back = int(state.get("went_back", 0))
        self.curve_lr = [float(v) for v in state.get("curve_lr", [])]
        self.curve_loss = [float(v) for v in state.get("curve_loss", [])]
        self.centered_lr = float(state.get("centered_lr", 0.0))
        self.edge_lr = float(state.get("edge_lr", 0.0))
        self.flat_lr, self.hint = float(state.get("flat_lr", 0.0)), float(state.get("hint", 0.0))
        self._request = str(state.get("request", "")) or None
        # None: decided at the next step; a checkpoint from before layer rates has no key and keeps running without
        rates = state.get("rates", [])
        self.rates = None if rates is None else [float(r) for r in rates]
        self._last_logged = float(state.get("last_logged", math.nan))
        self._last_step = int(state.get("last_step", -1))


@hookimpl
def metacore_register_controllers(register):
    register(AutoLRController)
