"""``attention_weights``: the softmax the forward pass applies, checked against
the paper's formula computed pixel by pixel, and against the forward pass."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from sasa_mmdet import AttentionStem, LocalSelfAttention2d, local_attention_weights
from sasa_mmdet.layers import sinusoidal_position_encoding
from sasa_mmdet.layers.attention_weights import tap_exists, tap_offsets

ENCODINGS = [  # position_encoding, logits
    ('relative', 'qk+qr'),
    ('relative', 'qr'),
    ('absolute', 'qk+qr'),
    ('absolute', 'qr'),
    ('none', 'qk+qr'),
]
GEOMETRIES = [  # window, dilation, (H, W)
    ((3, 3), (1, 1), (5, 6)),
    ((3, 5), (2, 1), (4, 7)),
    ((4, 4), (1, 1), (5, 5)),
]


def _layer(encoding, logits, window=(3, 3), dilation=(1, 1), channels=6, heads=2, **kwargs):
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(channels, channels, 3, num_heads=heads, window_size=window,
                                 dilation=dilation, position_encoding=encoding,
                                 logits=logits, **kwargs).double()
    if layer.rel_row is not None:  # make the q.r term matter as much as q.k
        layer.rel_row.data.mul_(2)
    return layer


def _by_the_formula(layer, x):
    """softmax over in-image taps of q_ij . k_ab + q_ij . r_{a-i,b-j} (or q.p /
    q.(k + p) for the absolute encoding), pixel by pixel, from the weights."""
    batch, _, height, width = x.shape
    heads, dim, out = layer.num_heads, layer.head_channels, layer.out_channels
    wq = layer.qkv_weight[:out].detach().view(heads, dim, -1)
    wk = layer.qkv_weight[out:2 * out].detach().view(heads, dim, -1)
    q = torch.einsum('ndc,bchw->bndhw', wq, x)
    k = torch.einsum('ndc,bchw->bndhw', wk, x)
    pos = None
    if layer.position_encoding == 'absolute':
        pos = sinusoidal_position_encoding(height, width, layer.row_channels,
                                           layer.col_channels, dtype=x.dtype)
    (kh, kw), (dh, dw) = layer.window_size, layer.dilation
    weights = torch.zeros(batch, heads, kh * kw, height, width, dtype=x.dtype)
    for b, n, i, j in itertools.product(range(batch), range(heads), range(height),
                                        range(width)):
        logits, taps = [], []
        for ty, tx in itertools.product(range(kh), range(kw)):
            a, c = i + (ty - (kh - 1) // 2) * dh, j + (tx - (kw - 1) // 2) * dw
            if not (0 <= a < height and 0 <= c < width):
                continue  # that neighbour does not exist
            query = q[b, n, :, i, j]
            logit = 0.0
            if layer.logits == 'qk+qr':
                logit = logit + query @ k[b, n, :, a, c]
            if layer.position_encoding == 'relative':
                r = torch.cat([layer.rel_row[ty, n], layer.rel_col[tx, n]]).detach()
                logit = logit + query @ r
            elif pos is not None:
                logit = logit + query @ pos[:, a, c]
            logits.append(logit)
            taps.append(ty * kw + tx)
        weights[b, n, taps, i, j] = torch.stack(logits).softmax(0)
    return weights


def assert_valid_weights(weights, window, dilation):
    """Sums to 1 over the taps, exactly 0 at taps outside the image."""
    height, width = weights.shape[-2:]
    exists = tap_exists(height, width, window, dilation)
    assert weights.shape[2] == window[0] * window[1]
    outside = weights[:, :, ~exists]
    assert (outside == 0).all(), f'{int((outside != 0).sum())} outside taps have a weight'
    torch.testing.assert_close(weights.sum(2), torch.ones_like(weights[:, :, 0]))
    assert (weights >= 0).all()


@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('encoding,logits', ENCODINGS)
def test_matches_the_formula(encoding, logits, geometry):
    window, dilation, (height, width) = geometry
    layer = _layer(encoding, logits, window, dilation)
    x = torch.randn(2, 6, height, width, dtype=torch.float64)
    weights = layer.attention_weights(x)
    assert weights.shape == (2, 2, window[0] * window[1], height, width)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, _by_the_formula(layer, x))
    assert_valid_weights(weights, window, dilation)


def _apply(weights, value, window, dilation):
    """sum_t w_t v_(ij + tap t): the weighted sum the weights imply."""
    height, width = value.shape[-2:]
    (kh, kw), (dh, dw) = window, dilation
    padded = F.pad(value, ((kw - 1) // 2 * dw, kw // 2 * dw, (kh - 1) // 2 * dh, kh // 2 * dh))
    out = torch.zeros_like(value)
    for t, (ty, tx) in enumerate(itertools.product(range(kh), range(kw))):
        shifted = padded[..., ty * dh:ty * dh + height, tx * dw:tx * dw + width]
        out = out + weights[:, :, t].unsqueeze(2).to(value.dtype) * shifted
    return out.flatten(1, 2)


@pytest.mark.parametrize('impl', ['auto', 'torch', 'reference'])
@pytest.mark.parametrize('encoding,logits', ENCODINGS)
def test_are_the_weights_the_forward_pass_uses(encoding, logits, impl):
    layer = _layer(encoding, logits, (3, 5), (1, 2), channels=8, stride=2, impl=impl,
                   bias=True).float()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(1, 8, 7, 9)
    with torch.no_grad():
        weights = layer.attention_weights(x)
        _, _, value = layer.project(x)
        expected = F.avg_pool2d(_apply(weights, value, (3, 5), (1, 2)), 2, 2, ceil_mode=True)
        expected = expected + layer.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_taps_are_in_row_major_window_order():
    # q.r only, one head: a large row embedding at row tap 0 and column
    # embedding at column tap 2 make tap 0 * kw + 2 the favourite of every
    # pixel whose window holds it.
    layer = LocalSelfAttention2d(2, 2, 3, num_heads=1, window_size=(3, 4), logits='qr')
    with torch.no_grad():
        layer.qkv_weight.zero_()
        layer.qkv_weight[0, 0] = layer.qkv_weight[1, 1] = 1  # q = x
        layer.rel_row.zero_()
        layer.rel_col.zero_()
        layer.rel_row[0, 0, 0] = 10
        layer.rel_col[2, 0, 0] = 10
    x = torch.ones(1, 2, 6, 6)
    weights = layer.attention_weights(x)
    assert (weights[0, 0, :, 1:, :-1].argmax(0) == 2).all()
    assert tap_offsets((3, 4))[2].tolist() == [-1, 1]


def test_border_taps_have_no_weight_and_the_centre_always_exists():
    layer = _layer('relative', 'qk+qr', (5, 5), (2, 2))
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    weights = layer.attention_weights(x)
    assert_valid_weights(weights, (5, 5), (2, 2))
    # at (0, 0) only taps with offsets >= 0 inside 3 x 4 exist: rows 0, 2; cols 0, 2
    nonzero = weights[0, 0, :, 0, 0].nonzero().flatten().tolist()
    assert nonzero == [12, 13, 17, 18]  # (ty, tx) in {2, 3} x {2, 3}


def test_validity_check_catches_broken_weights():
    """The checks above fail on the known mistakes: zero-padded keys left in
    the softmax (border taps get weight), and weights that do not sum to 1."""
    window, dilation = (3, 3), (1, 1)
    q, k = torch.randn(2, 1, 1, 2, 4, 5, dtype=torch.float64).unbind(0)
    good = local_attention_weights(q, k, window, dilation)
    assert_valid_weights(good, window, dilation)
    padded = F.pad(k, (1, 1, 1, 1))
    logits = torch.stack([(q * padded[..., y:y + 4, x:x + 5]).sum(2)
                          for y in range(3) for x in range(3)], 2)
    with pytest.raises(AssertionError, match='outside taps have a weight'):
        assert_valid_weights(logits.softmax(2), window, dilation)
    with pytest.raises(AssertionError):
        assert_valid_weights(good * 1.01, window, dilation)


def test_softmax_is_float32_for_half_inputs():
    layer = _layer('relative', 'qk+qr').to(torch.bfloat16)
    weights = layer.attention_weights(torch.randn(1, 6, 4, 4, dtype=torch.bfloat16))
    assert weights.dtype == torch.float32
    assert_valid_weights(weights, (3, 3), (1, 1))


def test_attention_stem_weights():
    torch.manual_seed(0)
    stem = AttentionStem(3, 8, num_heads=2).eval()
    x = torch.randn(1, 3, 9, 10)
    with torch.no_grad():
        weights = stem.attention_weights(x)
        assert weights.shape == (1, 2, 16, 9, 10)
        assert_valid_weights(weights, (4, 4), (1, 1))
        _, _, value = stem.attention.project(x)
        torch.testing.assert_close(stem.attention(x), _apply(weights, value, (4, 4), (1, 1)),
                                   rtol=1e-4, atol=1e-5)


def test_bad_calls_say_what_is_wrong():
    with pytest.raises(ValueError, match='pointwise convolution: it has no attention'):
        LocalSelfAttention2d(4, 4, 1).attention_weights(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r'expects input \(N, 6, H, W\), got \(1, 5, 3, 3\)'):
        _layer('relative', 'qk+qr').attention_weights(torch.randn(1, 5, 3, 3))
    q = torch.randn(1, 1, 2, 3, 3)
    with pytest.raises(ValueError, match='needs a key, relative tables, or both'):
        local_attention_weights(q, None, (3, 3))
    with pytest.raises(ValueError, match='rel_row and rel_col go together'):
        local_attention_weights(q, q, (3, 3), rel_row=torch.randn(3, 1, 1))
