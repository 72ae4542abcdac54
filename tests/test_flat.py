"""FlatBuffer: one contiguous mirror of a list of tensors."""

import pytest

torch = pytest.importorskip("torch")

from metacore.core.flat import FlatBuffer  # noqa: E402


def test_views_mirror_shapes_and_copy_sub_segment():
    a, b = torch.randn(3, 2), torch.randn(4)
    buf = FlatBuffer([a, b]).copy_([a, b])
    assert [v.shape for v in buf.views] == [a.shape, b.shape]
    assert torch.equal(buf.flat, torch.cat([a.reshape(-1), b]))
    buf.sub_([a, torch.ones(4)])
    assert torch.equal(buf.segment(0, 1), torch.zeros(6)) and torch.allclose(buf.segment(1, 2), b - 1)
    buf.views[1].fill_(7.0)  # views write through to the flat tensor
    assert torch.equal(buf.flat[6:], torch.full((4,), 7.0))


def test_dtype_is_at_least_float32():
    half, double = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float64)
    assert FlatBuffer([half]).flat.dtype == torch.float32
    assert FlatBuffer([half, double]).flat.dtype == torch.float64
    assert len(FlatBuffer([])) == 0
