"""Triton backend: fused local attention, forward and backward.

One program takes a tile of ``BLOCK_H x BLOCK_W`` pixels of one image and
head, and walks the window's taps. At each tap it reads the tile's
neighbours at that offset straight from K and V (masked loads: neighbours
outside the image do not exist, their weight is exactly 0; nothing is
padded or copied per tap) and runs an online softmax over the taps in
float32, whatever the input dtype (float32, bfloat16, float16).

- Forward: ``logit_t = q . (k_t + r_t)`` (the q.r term folded into the key:
  ``r_t = [rel_row[ty], rel_col[tx]]``, one dot product per tap), online
  softmax, ``out = sum_t p_t v_t``. It stores the output and one
  log-sum-exp per pixel and head, never the attention map.
- Backward, like FlashAttention's: ``delta = sum_d dout * out`` per pixel and
  head (PyTorch), then two kernels that recompute ``p_t`` from the
  log-sum-exp. The query kernel owns its pixels' dq and writes its
  tile's share of the relative tables' gradient to a buffer of partial sums,
  reduced afterwards by ``torch.sum``; the key kernel owns its pixels' dk and
  dv and gathers, for each tap, from the queries that read that pixel. So no
  reduction uses atomics, and the results are bit-reproducible run to run.

Head dims up to 128, any window (runtime loop over the taps), dilation.
The dots over the head channels are elementwise products and sums, not
``tl.dot``: each query has its own keys, so there is no matrix product to
give the tensor cores; this keeps every tile shape legal on every GPU (the
interpreter accepts ``tl.dot`` shapes under 16 that GPUs reject).
``TRITON_INTERPRET=1`` set before import runs the kernels on CPU tensors.
"""
import triton
import triton.language as tl

import torch

# Pixels per program times the (padded) head width stays at 2048 elements
# per tile, over 8 warps: 8 fp32 registers per tile and thread. The shifted
# tiles' loads are masked per element (borders), so they are not vectorised
# and every element carries its own address. Left to itself ptxas caps the
# registers at 128 (two programs per SM) and spills up to 52 bytes in the
# backward kernels; `maxnreg=255` lets it take what it needs (at most 167,
# no spills: tools/analysis/check_triton_kernels.py checks every
# configuration for sm_80 and sm_90).
TILE_ELEMENTS = 2048
BLOCK_W = 16
LAUNCH_OPTIONS = dict(num_warps=8, maxnreg=255)


def block_config(head_dim: int, value_dim: int) -> dict:
    """Tile sizes for head widths ``head_dim`` (q, k) and ``value_dim`` (v)."""
    block_d = triton.next_power_of_2(head_dim)
    block_dv = triton.next_power_of_2(value_dim)
    block_h = max(1, TILE_ELEMENTS // (BLOCK_W * max(block_d, block_dv)))
    return dict(BLOCK_H=block_h, BLOCK_W=BLOCK_W, BLOCK_D=block_d, BLOCK_DV=block_dv)


@triton.jit
def _tile(H, W, N, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's image, head and pixel rows/columns."""
    pid_bn = tl.program_id(1).to(tl.int64)
    tiles_w = tl.cdiv(W, BLOCK_W)
    pid = tl.program_id(0)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    i = (pid // tiles_w) * BLOCK_H + p // BLOCK_W
    j = (pid % tiles_w) * BLOCK_W + p % BLOCK_W
    return pid_bn // N, pid_bn % N, i, j, (i < H) & (j < W)


@triton.jit
def _planar_offsets(channels, rows, cols, W, HW):
    """Offsets of a ``(pixels, channels)`` tile in a planar ``(C, H, W)`` map."""
    return channels[None, :] * HW + rows[:, None] * W + cols[:, None]


@triton.jit
def _load_tile(base, channels, rows, cols, ok, C, W, HW):
    """A ``(pixels, channels)`` tile of a planar map in float32; zeros where
    the pixel is not ``ok`` (outside the image) and past the C channels."""
    mask = ok[:, None] & (channels < C)[None, :]
    return tl.load(base + _planar_offsets(channels, rows, cols, W, HW), mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _store_tile(base, tile, channels, rows, cols, ok, C, W, HW):
    mask = ok[:, None] & (channels < C)[None, :]
    tl.store(base + _planar_offsets(channels, rows, cols, W, HW),
             tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _position(RR, RC, n, ty, tx, d, N, D, DR, HAS_REL: tl.constexpr):
    """``r_t = [rel_row[ty], rel_col[tx]]`` of head n as one head-width vector
    (contiguous tables ``(kh, N, DR)`` and ``(kw, N, D - DR)``)."""
    if HAS_REL:
        row = tl.load(RR + (ty * N + n) * DR + d, mask=d < DR, other=0.0)
        col = tl.load(RC + (tx * N + n) * (D - DR) + (d - DR), mask=(d >= DR) & (d < D),
                      other=0.0)
        return row.to(tl.float32) + col.to(tl.float32)
    else:
        return tl.zeros(d.shape, tl.float32)


@triton.jit
def _neighbours(K, V, RR, RC, n, i, j, p_ok, ty, tx, d, dv, H, W, N, D, DV, DR, KH, KW, DH,
                DW, HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr):
    """The tile's neighbours at tap (ty, tx): ``k_t + r_t`` and ``v_t`` (zeros
    where the neighbour is outside the image) and where they exist."""
    ki = i + (ty - (KH - 1) // 2) * DH
    kj = j + (tx - (KW - 1) // 2) * DW
    ok = p_ok & (ki >= 0) & (ki < H) & (kj >= 0) & (kj < W)
    key = _position(RR, RC, n, ty, tx, d, N, D, DR, HAS_REL)[None, :]
    if HAS_KEY:
        key = key + _load_tile(K, d, ki, kj, ok, D, W, H * W)
    return key, _load_tile(V, dv, ki, kj, ok, DV, W, H * W), ok


@triton.jit
def _forward_kernel(Q, K, V, RR, RC, OUT, LSE,
                    sqb, sqn, skb, skn, svb, svn, sob, son,
                    H, W, N, D, DV, DR, KH, KW, DH, DW,
                    HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    b, n, i, j, p_ok = _tile(H, W, N, BLOCK_H, BLOCK_W)
    HW = H * W  # planar layout: channel stride H * W, row stride W, column stride 1
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * sqb + n * sqn, d, i, j, p_ok, D, W, HW)
    # A finite start, so that taps that do not exist (logit -inf) give
    # exp(-inf - m) = 0 and never NaN; the centre tap always exists.
    m = tl.full([BLOCK_H * BLOCK_W], -1e30, tl.float32)
    denom = tl.zeros([BLOCK_H * BLOCK_W], tl.float32)
    acc = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_DV], tl.float32)
    for ty in range(KH):
        for tx in range(KW):
            key, value, ok = _neighbours(K + b * skb + n * skn, V + b * svb + n * svn, RR, RC,
                                         n, i, j, p_ok, ty, tx, d, dv, H, W, N, D, DV, DR, KH,
                                         KW, DH, DW, HAS_KEY, HAS_REL)
            logit = tl.where(ok, tl.sum(q * key, axis=1), float('-inf'))
            m_new = tl.maximum(m, logit)
            scale = tl.exp(m - m_new)
            weight = tl.exp(logit - m_new)
            denom = denom * scale + weight
            acc = acc * scale[:, None] + weight[:, None] * value
            m = m_new
    denom_safe = tl.where(denom > 0, denom, 1.0)  # only padding lanes have 0
    _store_tile(OUT + b * sob + n * son, acc / denom_safe[:, None], dv, i, j, p_ok, DV, W, HW)
    tl.store(LSE + ((b * N + n) * H + i) * W + j, m + tl.log(denom_safe), mask=p_ok)


@triton.jit
def _backward_query_kernel(Q, K, V, RR, RC, DOUT, LSE, DELTA, DQ, DREL,
                           sqb, sqn, skb, skn, svb, svn, sgb, sgn, sdb, sdn,
                           H, W, N, D, DV, DR, KH, KW, DH, DW,
                           HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq of this tile's queries and the tile's partial sums of the tables'
    gradient, ``DREL[bn, tile, t, d]``."""
    b, n, i, j, p_ok = _tile(H, W, N, BLOCK_H, BLOCK_W)
    HW = H * W
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * sqb + n * sqn, d, i, j, p_ok, D, W, HW)
    dout = _load_tile(DOUT + b * sgb + n * sgn, dv, i, j, p_ok, DV, W, HW)
    pixel = ((b * N + n) * H + i) * W + j
    lse = tl.load(LSE + pixel, mask=p_ok, other=0.0)
    delta = tl.load(DELTA + pixel, mask=p_ok, other=0.0)
    dq = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_D], tl.float32)
    tile = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    drel = DREL + tile * KH * KW * BLOCK_D
    for ty in range(KH):
        for tx in range(KW):
            key, value, ok = _neighbours(K + b * skb + n * skn, V + b * svb + n * svn, RR, RC,
                                         n, i, j, p_ok, ty, tx, d, dv, H, W, N, D, DV, DR, KH,
                                         KW, DH, DW, HAS_KEY, HAS_REL)
            weight = tl.where(ok, tl.exp(tl.sum(q * key, axis=1) - lse), 0.0)
            dlogit = weight * (tl.sum(dout * value, axis=1) - delta)
            dq += dlogit[:, None] * key
            if HAS_REL:
                tl.store(drel + (ty * KW + tx) * BLOCK_D + d, tl.sum(dlogit[:, None] * q, axis=0))
    _store_tile(DQ + b * sdb + n * sdn, dq, d, i, j, p_ok, D, W, HW)


@triton.jit
def _backward_key_kernel(Q, K, V, RR, RC, DOUT, LSE, DELTA, DK, DV_,
                         sqb, sqn, skb, skn, svb, svn, sgb, sgn, sdkb, sdkn, sdvb, sdvn,
                         H, W, N, D, DV, DR, KH, KW, DH, DW,
                         HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk and dv of this tile's pixels, gathered from the queries that read
    them: the query at ``pixel - offset_t`` reads this pixel at tap t."""
    b, n, i, j, p_ok = _tile(H, W, N, BLOCK_H, BLOCK_W)
    HW = H * W
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    key_own = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_D], tl.float32)
    if HAS_KEY:
        key_own = _load_tile(K + b * skb + n * skn, d, i, j, p_ok, D, W, HW)
    value = _load_tile(V + b * svb + n * svn, dv, i, j, p_ok, DV, W, HW)
    dk = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_D], tl.float32)
    dval = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_DV], tl.float32)
    for ty in range(KH):
        qi = i - (ty - (KH - 1) // 2) * DH
        row_ok = p_ok & (qi >= 0) & (qi < H)
        for tx in range(KW):
            qj = j - (tx - (KW - 1) // 2) * DW
            ok = row_ok & (qj >= 0) & (qj < W)
            key = key_own + _position(RR, RC, n, ty, tx, d, N, D, DR, HAS_REL)[None, :]
            q = _load_tile(Q + b * sqb + n * sqn, d, qi, qj, ok, D, W, HW)
            dout = _load_tile(DOUT + b * sgb + n * sgn, dv, qi, qj, ok, DV, W, HW)
            pixel = ((b * N + n) * H + qi) * W + qj
            lse = tl.load(LSE + pixel, mask=ok, other=0.0)
            weight = tl.where(ok, tl.exp(tl.sum(q * key, axis=1) - lse), 0.0)
            dval += weight[:, None] * dout
            if HAS_KEY:
                delta = tl.load(DELTA + pixel, mask=ok, other=0.0)
                dlogit = weight * (tl.sum(dout * value, axis=1) - delta)
                dk += dlogit[:, None] * q
    _store_tile(DV_ + b * sdvb + n * sdvn, dval, dv, i, j, p_ok, DV, W, HW)
    if HAS_KEY:
        _store_tile(DK + b * sdkb + n * sdkn, dk, d, i, j, p_ok, D, W, HW)


def _grid(query, config) -> tuple:
    batch, heads, _, height, width = query.shape
    return (triton.cdiv(height, config['BLOCK_H']) * triton.cdiv(width, config['BLOCK_W']),
            batch * heads)


def _geometry_args(query, value, rel_row, window, dilation) -> tuple:
    _, heads, dim, height, width = query.shape
    dim_row = rel_row.shape[-1] if rel_row is not None else 0
    return (height, width, heads, dim, value.shape[2], dim_row, *window, *dilation)


def _planar(t):
    """``t`` in the planar layout the kernels address (channel, row and
    column strides ``H * W``, ``W``, 1; any batch and head strides), copying
    only if needed."""
    _, _, dim, height, width = t.shape
    want = (height * width, width, 1)
    if all(s == w or n == 1 for s, w, n in zip(t.stride()[2:], want, t.shape[2:])):
        return t
    return t.contiguous()


def _strides(t) -> tuple:
    return t.stride(0), t.stride(1)


def _tables(rel_row, rel_col, like) -> tuple:
    if rel_row is None:  # never read: HAS_REL is off
        return like, like
    return rel_row.contiguous(), rel_col.contiguous()


def forward(query, key, value, rel_row, rel_col, window, dilation, keep_attention):
    """Returns ``(out, lse)``: out in v's dtype, lse ``(B, N, H, W)`` float32.
    ``keep_attention`` is ignored: the map is never stored."""
    batch, heads, _, height, width = query.shape
    has_key = key is not None
    query, value = _planar(query), _planar(value)
    key = _planar(key) if has_key else query  # never read without HAS_KEY
    out = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    lse = torch.empty((batch, heads, height, width), dtype=torch.float32, device=query.device)
    config = block_config(query.shape[2], value.shape[2])
    rr, rc = _tables(rel_row, rel_col, query)
    _forward_kernel[_grid(query, config)](
        query, key, value, rr, rc, out, lse,
        *_strides(query), *_strides(key), *_strides(value), *_strides(out),
        *_geometry_args(query, value, rel_row, window, dilation),
        HAS_KEY=has_key, HAS_REL=rel_row is not None, **LAUNCH_OPTIONS, **config)
    return out, lse


def backward(grad_out, out, lse, query, key, value, rel_row, rel_col, window, dilation,
             grad_query, grad_key, grad_value):
    """Writes dq, dk, dv into the given buffers; returns the tables'
    gradients in float32 (None without tables)."""
    has_key = key is not None
    config = block_config(query.shape[2], value.shape[2])
    grid = _grid(query, config)
    delta = (grad_out.float() * out.float()).sum(dim=2).contiguous()  # (B, N, H, W)
    query, value, grad_out = _planar(query), _planar(value), _planar(grad_out)
    key = _planar(key) if has_key else query
    # The kernels write planar buffers; others get a copy afterwards.
    buffers = (grad_query, grad_key, grad_value)
    targets = [None if b is None else _planar(b) for b in buffers]
    grad_q, grad_k, grad_v = targets
    rr, rc = _tables(rel_row, rel_col, query)
    taps = window[0] * window[1]
    partial = torch.empty((grid[1], grid[0], taps, config['BLOCK_D']) if rel_row is not None
                          else (1, ), dtype=torch.float32, device=query.device)
    geometry = _geometry_args(query, value, rel_row, window, dilation)
    flags = dict(HAS_KEY=has_key, HAS_REL=rel_row is not None, **LAUNCH_OPTIONS, **config)
    _backward_query_kernel[grid](
        query, key, value, rr, rc, grad_out, lse, delta, grad_q, partial,
        *_strides(query), *_strides(key), *_strides(value), *_strides(grad_out),
        *_strides(grad_q), *geometry, **flags)
    grad_k = grad_v if grad_k is None else grad_k  # never written without HAS_KEY
    _backward_key_kernel[grid](
        query, key, value, rr, rc, grad_out, lse, delta, grad_k, grad_v,
        *_strides(query), *_strides(key), *_strides(value), *_strides(grad_out),
        *_strides(grad_k), *_strides(grad_v), *geometry, **flags)
    for buffer, target in zip(buffers, targets):
        if buffer is not None and target is not buffer:
            buffer.copy_(target)
    if rel_row is None:
        return None, None
    kh, kw = window
    dim_row = rel_row.shape[-1]
    heads = query.shape[1]
    # (B * N, tiles, kh * kw, BLOCK_D) -> (N, kh, kw, BLOCK_D)
    per_tap = partial.view(query.shape[0], heads, grid[0], kh, kw, -1).sum(dim=(0, 2))
    grad_rel_row = per_tap[..., :dim_row].sum(dim=2).transpose(0, 1)  # (kh, N, Dr)
    grad_rel_col = per_tap[..., dim_row:query.shape[2]].sum(dim=1).transpose(0, 1)
    return grad_rel_row.contiguous(), grad_rel_col.contiguous()
