import math

import pytest

from metacore.core.errors import ControllerError, UsageError
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.options import OptionSet, OptionSpec, parse_assignments


def space():
    return HParamSpace([
        HParamSpec("lr", 0.1, 1e-6, 10.0, log=True),
        HParamSpec("momentum", 0.9, 0.0, 0.999),
        HParamSpec("batch_size", 32, 8, 256, acts_on="data", integer=True),
    ])


def test_resolve_overrides_defaults_and_parses_strings():
    values = space().resolve({"lr": "0.5", "batch_size": "64"})
    assert values == {"lr": 0.5, "momentum": 0.9, "batch_size": 64}
    assert isinstance(values["batch_size"], int)


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "abc", "100", "0"])
def test_bad_lr_values_are_rejected(raw):
    with pytest.raises(UsageError, match="lr"):
        space().validate({"lr": raw})


def test_unknown_name_lists_known():
    with pytest.raises(UsageError, match="known: lr, momentum, batch_size"):
        space().validate({"beta": "1"})


def test_integer_spec_rejects_fractions():
    with pytest.raises(UsageError, match="integer"):
        space().validate({"batch_size": "12.5"})


def test_sanitize_clips_floats_and_rejects_nonfinite():
    s = space()
    assert s.sanitize({"lr": 1e9}, "x") == {"lr": 10.0}
    assert s.sanitize({"momentum": -3}, "x") == {"momentum": 0.0}
    with pytest.raises(ControllerError, match="non-finite"):
        s.sanitize({"lr": math.nan}, "x")
    with pytest.raises(ControllerError, match="unknown"):
        s.sanitize({"nope": 1.0}, "x")


def test_sanitize_clamps_tensors_without_leaving_the_device():
    import torch

    out = space().sanitize({"lr": torch.tensor(1e-9), "momentum": torch.tensor(2.0)}, "x")
    assert isinstance(out["lr"], torch.Tensor)
    assert out["lr"].item() == pytest.approx(1e-6)
    assert out["momentum"].item() == pytest.approx(0.999)
    with pytest.raises(ControllerError, match="non-finite lr=nan"):  # refused like a NaN float
        space().sanitize({"lr": torch.tensor(float("nan"))}, "x")


def test_spec_rejects_inconsistent_declaration():
    with pytest.raises(ValueError):
        HParamSpec("lr", 1.0, 0.0, 2.0, log=True)
    with pytest.raises(ValueError):
        HParamSpec("lr", 5.0, 0.1, 2.0)


def test_options_and_assignments():
    opts = OptionSet("controller x", {"k": OptionSpec("k", 3, int, low=1, high=10),
                                      "mode": OptionSpec("mode", "a", str, choices=("a", "b")),
                                      "flag": OptionSpec("flag", False, bool)})
    assert opts.resolve({"k": "4", "mode": "b", "flag": "yes"}) == {"k": 4, "mode": "b", "flag": True}
    for bad in ({"k": "0"}, {"mode": "c"}, {"flag": "maybe"}, {"zzz": "1"}, {"k": "x"}):
        with pytest.raises(UsageError):
            opts.resolve(bad)
    assert parse_assignments(["a=1", " b = x=y "], "--set") == {"a": "1", "b": "x=y"}
    with pytest.raises(UsageError, match="--set"):
        parse_assignments(["novalue"], "--set")
