"""SAN's registered operators (``sasa_mmdet/layers/san_ops.py``).

Every backend equals the unfold reference, outputs and every gradient, in
both border modes, at odd sizes, dilations, and windows larger than the map
(the mirroring repeats) or a one-pixel axis; ``gradcheck`` and
``torch.library.opcheck`` pass for every op and backend.

The Triton backend runs on CUDA tensors where a GPU is visible (compiled
kernels: tools/gpu_check.sh runs this file there), else on CPU tensors
under Triton's interpreter (tests/conftest.py); the other backends on CPU.
"""
import pytest
import torch

from sasa_mmdet.layers.backends.san_geometry import neighbour_indices, reflect
from sasa_mmdet.layers.san_ops import (TRITON_INSTALLED, resolve_san_backend, san_aggregation,
                                       san_aggregation_reference, san_gather, san_subtraction,
                                       san_subtraction_reference, san_unfold_reference)
from sasa_mmdet.layers.backends import san_cpu

# The Triton kernels run on CUDA when there is a GPU, else under the
# interpreter (tests/conftest.py).
BACKENDS = ['torch', pytest.param('cpp', marks=pytest.mark.skipif(
    not san_cpu.KERNEL_BUILT, reason='the SAN CPU kernel is not built')),
    pytest.param('triton', marks=pytest.mark.skipif(
        not TRITON_INSTALLED, reason='triton is not installed'))]
BORDERS = ['reflect', 'mask']
# (window, dilation, (H, W)): odd sizes, a dilated non-square window, a 7x7
# window on a 2x3 map, a one-pixel axis.
GEOMETRIES = [((3, 3), (1, 1), (5, 7)), ((5, 3), (2, 1), (6, 5)), ((7, 7), (1, 1), (2, 3)),
              ((3, 5), (1, 1), (1, 4))]


def _device(backend: str) -> str:
    """Where ``backend``'s inputs live: CUDA for Triton when there is a GPU."""
    return 'cuda' if backend == 'triton' and torch.cuda.is_available() else 'cpu'


def _rand(*shape, seed=0, device='cpu'):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()


def test_reflect_indices():
    # nn.ReflectionPad2d's rule inside its range, then periodic mirroring
    assert [reflect(i, 4) for i in range(-3, 7)] == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    assert [reflect(i, 1) for i in (-2, 0, 3)] == [0, 0, 0]
    assert neighbour_indices(3, 3, 1, 'mask').tolist() == [[-1, 0, 1], [0, 1, 2], [1, 2, -1]]


def test_reference_matches_reflection_pad_unfold():
    """The reference is the official code's definition: ReflectionPad2d,
    then unfold (where the pad fits the map)."""
    x = _rand(2, 3, 6, 7).detach()
    taps = san_unfold_reference(x, (5, 5), (1, 1), 'reflect')
    unfolded = torch.nn.functional.unfold(torch.nn.ReflectionPad2d(2)(x), 5)
    torch.testing.assert_close(taps.flatten(1, 2).flatten(2), unfolded, rtol=0, atol=0)
    zeros = torch.nn.functional.unfold(torch.nn.functional.pad(x, (2, 2, 2, 2)), 5)
    torch.testing.assert_close(san_unfold_reference(x, (5, 5), (1, 1), 'mask').flatten(1, 2)
                               .flatten(2), zeros, rtol=0, atol=0)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('border', BORDERS)
@pytest.mark.parametrize('window,dilation,size', GEOMETRIES)
def test_aggregation_matches_reference(backend, border, window, dilation, size):
    value = _rand(2, 6, *size, device=_device(backend))
    weight = _rand(2, 3, window[0] * window[1], *size, seed=1, device=_device(backend))
    expected = san_aggregation_reference(value, weight, window, dilation, border)
    out = san_aggregation(value, weight, window, dilation, border, backend)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (value, weight), grad),
                         torch.autograd.grad(expected, (value, weight), grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('border', BORDERS)
@pytest.mark.parametrize('window,dilation,size', GEOMETRIES)
def test_subtraction_and_gather_match_reference(backend, border, window, dilation, size):
    x1 = _rand(2, 3, *size, device=_device(backend))
    x2 = _rand(2, 3, *size, seed=1, device=_device(backend))
    expected = san_subtraction_reference(x1, x2, window, dilation, border)
    out = san_subtraction(x1, x2, window, dilation, border, backend)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x1, x2), grad),
                         torch.autograd.grad(expected, (x1, x2), grad)):
        torch.testing.assert_close(got, want)
    expected = san_unfold_reference(x2, window, dilation, border)
    out = san_gather(x2, window, dilation, border, backend)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out, x2, grad)[0],
                               torch.autograd.grad(expected, x2, grad)[0])


@pytest.mark.parametrize('backend', BACKENDS)
def test_same_tensor_subtraction(backend):
    """The pairwise position relation subtracts a map from itself."""
    p = _rand(1, 2, 4, 5, device=_device(backend))
    out = san_subtraction(p, p, (3, 3), (1, 1), 'reflect', backend)
    assert out[:, :, 4].abs().max() == 0  # the centre tap
    expected = san_subtraction_reference(p, p, (3, 3), (1, 1), 'reflect')
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, p, grad)[0],
                               torch.autograd.grad(expected, p, grad)[0])


# (the Triton kernels' gradients are held to the reference's above; gradcheck's
# many evaluations take minutes under the interpreter)
@pytest.mark.parametrize('backend', BACKENDS[:2])
@pytest.mark.parametrize('border', BORDERS)
def test_gradcheck(backend, border):
    value, weight = _rand(1, 4, 3, 4), _rand(1, 2, 9, 3, 4, seed=1)
    assert torch.autograd.gradcheck(
        lambda v, w: san_aggregation(v, w, (3, 3), (1, 1), border, backend), (value, weight))
    x1, x2 = _rand(1, 2, 3, 4, seed=2), _rand(1, 2, 3, 4, seed=3)
    assert torch.autograd.gradcheck(
        lambda a, b: san_subtraction(a, b, (3, 3), (1, 2), border, backend), (x1, x2))
    assert torch.autograd.gradcheck(
        lambda a: san_gather(a, (3, 3), (1, 1), border, backend), (x2,))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('border', BORDERS)
def test_opcheck(backend, border):
    geometry = ((3, 3), (1, 1), border, backend)
    device = _device(backend)
    value, weight = _rand(2, 4, 3, 5, device=device), _rand(2, 2, 9, 3, 5, seed=1, device=device)
    ops = torch.ops.sasa_mmdet
    torch.library.opcheck(ops.san_aggregation.default, (value, weight, *geometry))
    torch.library.opcheck(ops.san_aggregation_backward.default,
                          (_rand(2, 4, 3, 5, seed=4, device=device).detach(), value.detach(),
                           weight.detach(), *geometry))
    torch.library.opcheck(ops.san_subtraction.default,
                          (_rand(2, 4, 3, 5, seed=2, device=device), value, *geometry))
    torch.library.opcheck(ops.san_gather.default, (value, *geometry))
    torch.library.opcheck(ops.san_gather_backward.default,
                          (_rand(2, 4, 9, 3, 5, seed=5, device=device).detach(), 3, 5,
                           *geometry))


@pytest.mark.parametrize('backend', BACKENDS)
def test_float32_and_half_inputs(backend):
    value = torch.randn(1, 4, 5, 5, device=_device(backend))
    weight = torch.rand(1, 2, 9, 5, 5, device=_device(backend))
    expected = san_aggregation_reference(value, weight, (3, 3))
    torch.testing.assert_close(san_aggregation(value, weight, (3, 3), impl=backend), expected)
    out = san_aggregation(value.bfloat16(), weight, (3, 3), impl=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_bad_inputs():
    value, weight = torch.rand(1, 6, 4, 4), torch.rand(1, 4, 9, 4, 4)
    with pytest.raises(ValueError, match='Cw dividing C=6'):
        san_aggregation(value, weight, (3, 3))
    with pytest.raises(ValueError, match='T=25'):
        san_aggregation(value, torch.rand(1, 3, 9, 4, 4), (5, 5))
    with pytest.raises(ValueError, match='border must be one of'):
        san_gather(value, (3, 3), border='zeros')
    with pytest.raises(ValueError, match='pairs of positive ints'):
        san_gather(value, (3, 0))
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        san_gather(value[0], (3, 3))
    with pytest.raises(ValueError, match='one shape and dtype'):
        san_subtraction(value, value[:, :3], (3, 3))
    with pytest.raises(ValueError, match='impl must be one of'):
        resolve_san_backend('natten', torch.device('cpu'))
    with pytest.raises(ValueError, match="impl='cpp' needs CPU tensors"):
        resolve_san_backend('cpp', torch.device('meta'))
