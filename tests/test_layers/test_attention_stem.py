from unittest import mock

import pytest
import torch

from sasa_mmdet.layers import AttentionStem, SpatiallyAwareAttention2d


def test_output_stride_four_for_any_size():
    stem = AttentionStem(3, 8, num_heads=4)
    for height, width in [(1, 1), (5, 7), (64, 64), (65, 50), (125, 130)]:
        out = stem(torch.rand(2, 3, height, width))
        assert out.shape == (2, 8, -(-height // 4), -(-width // 4))


def test_matches_resnet_conv_stem_size():
    conv_stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7, 2, 3),
                                    torch.nn.MaxPool2d(3, 2, 1))
    stem = AttentionStem(3, 8, num_heads=4)
    for size in [(33, 47), (125, 130), (64, 63)]:
        x = torch.rand(1, 3, *size)
        assert stem(x).shape == conv_stem(x).shape


def test_mixture_weights_are_pooling_window_aligned_convex_mixes():
    layer = SpatiallyAwareAttention2d(3, 8, 4, num_heads=4, num_value_mixtures=3)
    mix = layer.mixture_weights(9, 10)
    assert mix.shape == (3, 9, 10)
    torch.testing.assert_close(mix.sum(0), torch.ones(9, 10))
    assert (mix > 0).all()
    torch.testing.assert_close(mix[:, 4:8, 4:8], mix[:, 0:4, 0:4])
    assert not torch.allclose(mix[:, 0, 0], mix[:, 1, 2])


@pytest.mark.parametrize('height,width', [(5, 6), (8, 8), (1, 3), (9, 4)])
def test_values_are_the_mixed_value_matrices(height, width):
    """Mixed once per place in the tile, the values equal the formula's
    per-pixel mix of the m projections, also where the tile is cut off."""
    layer = SpatiallyAwareAttention2d(3, 4, 4, num_heads=2, num_value_mixtures=2).double()
    x = torch.rand(2, 3, height, width, dtype=torch.float64)
    _, _, v = layer.project(x)
    w_v = layer.qkv_weight[8:].view(2, 4, 3)
    mix = layer.mixture_weights(height, width)
    expected = torch.einsum('mhw,moc,bchw->bohw', mix, w_v, x)
    torch.testing.assert_close(v.flatten(1, 2), expected)
    # what an ONNX export records: the places' one-hots and one product
    with mock.patch('torch.onnx.is_in_onnx_export', return_value=True):
        _, _, v_exported = layer.project(x)
    torch.testing.assert_close(v_exported.flatten(1, 2), expected)


def test_gradcheck_and_reference():
    fast = SpatiallyAwareAttention2d(3, 4, 4, num_heads=2, num_value_mixtures=2).double()
    ref = SpatiallyAwareAttention2d(3, 4, 4, num_heads=2, num_value_mixtures=2,
                                    impl='reference').double()
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast(x), ref(x))
    assert torch.autograd.gradcheck(fast, (x, ))
    stem = AttentionStem(3, 4, num_heads=2, num_value_mixtures=2).double().eval()
    assert torch.autograd.gradcheck(stem, (torch.rand(1, 3, 6, 5, dtype=torch.float64,
                                                      requires_grad=True), ))


def test_every_parameter_gets_a_gradient():
    stem = AttentionStem(3, 8, num_heads=4)
    stem(torch.rand(2, 3, 16, 16)).sum().backward()
    for name, p in stem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments():
    with pytest.raises(ValueError, match='num_value_mixtures'):
        SpatiallyAwareAttention2d(3, 8, 4, num_heads=4, num_value_mixtures=0)
    with pytest.raises(ValueError, match='mixture_period'):
        SpatiallyAwareAttention2d(3, 8, 4, num_heads=4, mixture_period=-1)
    with pytest.raises(ValueError, match='kernel_size'):
        SpatiallyAwareAttention2d(3, 8, 1, num_heads=4)
    with pytest.raises(ValueError, match='num_heads'):
        AttentionStem(3, 6, num_heads=4)


def test_bf16_autocast_softmaxes_in_float32(softmax_dtypes):
    stem = AttentionStem(3, 8, num_heads=2)
    x = torch.rand(2, 3, 13, 10) * 10
    expected = stem(x)
    softmax_dtypes.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = stem(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # the mixture weights' softmax and the attention's
    assert len(softmax_dtypes) == 2
    assert all(dtype == torch.float32 for _, dtype in softmax_dtypes)
    torch.testing.assert_close(out.float(), expected, atol=0.1 * expected.abs().max().item(),
                               rtol=0.05)
