"""Triton backend: fused local attention on tensor cores, forward and backward.

The kernels work the way fused neighbourhood attention does (NATTEN's FNA,
FlashAttention-2), with SASA's exact semantics: logits ``q.k + q.r`` (no
scaling), neighbours outside the image masked out of the softmax (they do
not exist; they are not zeros), the softmax in float32.

Tiles and halo. A program owns a ``TILE_H x TILE_W`` (8 x 8) tile of pixels
of one image and head. The keys its queries' windows cover form the halo,
``(8 + kh - 1) x (8 + kw - 1)`` pixels, which the program walks in blocks of
``BLOCK_H x 16`` keys (``BLOCK_H`` 8 rows at head widths up to 16, 4 at 32,
2 at 64, 1 at 128: :func:`block_config`), with an online softmax across
the blocks. Per block it loads K and V once and runs ``S = Q @ K_block^T``
and ``O += P @ V_block`` as ``tl.dot`` on tensor cores (head widths padded
to at least 16); each query is masked to its own window and the image. The
extra products over the halo cost less than gathering each query's own
window would. With dilation ``(dh, dw)`` a tile takes queries on one
sub-lattice (rows ``= r mod dh``, columns ``= c mod dw``), whose neighbours
lie on the same sub-lattice: dilated attention is dense attention on a
subsampled grid, at the same cost. Four warps per program, one stage.

The q.r term and the mask. ``A = Q @ RowT`` and ``B = Q @ ColT``
(``RowT[d, t] = rel_row[t, n, d]`` on the row part of the channels,
``ColT`` on the column part; one small product each, per tile) give every
query's term for every tap row and tap column. Per block, a ``tl.gather``
places them on the block's rows and columns (``(queries, 16)`` each, -1e30
where the row or column is outside the query's window or the image), and
two products with one-hot matrices spread them over the block's keys: no
per-pixel map of relative positions, and the mask costs no per-key
comparisons. These small products, and every product with a float32
operand, use ``input_precision='tf32x3'`` (tensor cores, float32 accuracy).

Backward, like FlashAttention-2's, recomputing ``P`` from the stored
log-sum-exp:

- the query kernel (dQ owned by query tiles) first walks its halo to get
  ``delta_i = sum_j P_ij dP_ij`` (which equals ``dout_i . out_i``, so the
  forward's output is never needed and never saved), stores it, then walks
  it again for ``dQ = dS @ K + dA @ RowT^T + dB @ ColT^T``, where ``dA``
  and ``dB`` are ``dS`` summed per tap row and column. Its tables' gradient
  ``Q^T @ [dA | dB]`` it accumulates over a column of tiles, and writes one
  ``(D, 2 x taps)`` partial sum per program, reduced afterwards by
  ``torch.sum`` in a fixed order (a few MB, not O(D^2) per pixel);
- the key kernel (dK and dV owned by key tiles) visits the queries whose
  windows cover its keys (the same halo, seen from the key side):
  ``dV = P^T @ dO``, ``dK = dS^T @ Q``.

No reduction uses atomics: the gradients are bit-reproducible run to run.

Precision. Half-precision inputs enter ``tl.dot`` as they are (P and dS are
rounded to the input dtype for their products, as FlashAttention's are);
float32 inputs use ``tf32x3``. Loads inside the halo loops are not masked
(addresses clamped to the image, channels to the head width): what they
read outside is masked out of the softmax or meets the other operand's
zero channels.

Head widths: D and Dv up to 128 (:data:`MAX_HEAD_DIM`; larger ones are
refused). Window and dilation any size, as runtime arguments (a window
wider than 16 taps compiles a wider tap table). Map sizes and strides are
not specialised (``do_not_specialize``), so one compile serves every
feature-map size: the compiles per run are the (dtype, padded head width,
logit terms) combinations the model uses, times three kernels.

What is not fast: every element is loaded on its own address (the rows of
the planar ``(B, N, D, H, W)`` layout the projection writes are not
aligned, so nothing is vectorised, and no ``cp.async``/TMA); the halo of a
3 x 3 window wastes most of its products; the halo blocks are not
software-pipelined; the kernels use up to 255 registers (two programs per
SM) and the backward kernels spill at some head widths
(tools/analysis/check_triton_kernels.py reports which).

``TRITON_INTERPRET=1`` set before import runs the kernels on CPU tensors.
The interpreter computes ``tl.dot`` on bfloat16 wrongly (Triton 3.8), so
under it bfloat16 operands are upcast to float32 before each product (the
rounding of P and dS to bfloat16 is kept); GPUs multiply bfloat16 directly.
"""
import contextlib
import os

import triton
import triton.language as tl

import torch

MAX_HEAD_DIM = 128
TILE_H = 8    # pixels a program owns: TILE_H x TILE_W (queries, or keys)
TILE_W = 8
BLOCK_W = 16  # halo block walked per step: BLOCK_H x BLOCK_W keys (queries), with
HALO_ELEMENTS = 2048  # BLOCK_H x BLOCK_W x (padded head width) at most: the loads
# address every element (the planar layout's rows are not aligned, so they
# are not vectorised), and more in flight spill registers.
LAUNCH_OPTIONS = dict(num_warps=4, num_stages=1)
# The query kernel's programs each take a column of tiles, so that the
# tables' partial sums stay at most about this many per image and head.
MAX_TABLE_PARTIALS = 4096
INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'
LOG2E = 1.4426950408889634

# Map sizes and strides change with every feature map: one compile for all.
_RUNTIME_INTS = ['H', 'W', 'N', 'D', 'DV', 'DR', 'KH', 'KW', 'DH', 'DW', 'tile_rows',
                 'sqb', 'sqn', 'sqc', 'sqh', 'skb', 'skn', 'skc', 'skh',
                 'svb', 'svn', 'svc', 'svh', 'sob', 'son', 'soc', 'soh',
                 'sgb', 'sgn', 'sgc', 'sgh', 'swb', 'swn', 'swc', 'swh']


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in names if n in _RUNTIME_INTS])


def block_config(head_dim: int, value_dim: int, window=(7, 7)) -> dict:
    """Block sizes for head widths ``head_dim`` (q, k), ``value_dim`` (v)
    and ``window``: widths padded to a power of two of at least 16 (the
    smallest ``tl.dot`` operand), taps likewise."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(value_dim))
    block_h = max(1, min(TILE_H, HALO_ELEMENTS // (BLOCK_W * max(block_d, block_dv))))
    return dict(TILE_H=TILE_H, TILE_W=TILE_W, BLOCK_H=block_h, BLOCK_W=BLOCK_W,
                BLOCK_D=block_d, BLOCK_DV=block_dv,
                BLOCK_T=max(16, triton.next_power_of_2(max(window))))


# ---------------------------------------------------------------------------
# Pieces shared by the kernels.


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """``a @ b`` with a float32 accumulator; float32 operands at float32
    accuracy (3 tf32 products); ``UPCAST`` for the interpreter's bfloat16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision='tf32x3')
    else:
        return tl.dot(a, b)


@triton.jit
def _lattice_tile(tile, H, W, DH, DW, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Tile ``tile`` of the grid: its sub-lattice (row, column residues mod
    the dilation) and its origin in that sub-lattice's coordinates (rows
    ``ry + DH * sy``). Returns ``(ry, rx, sy0, sx0, tiles_h)``."""
    tiles_h = tl.cdiv(tl.cdiv(H, DH), TILE_H)
    tiles_w = tl.cdiv(tl.cdiv(W, DW), TILE_W)
    lattice = tile // (tiles_h * tiles_w)
    within = tile % (tiles_h * tiles_w)
    return (lattice // DW, lattice % DW, (within // tiles_w) * TILE_H,
            (within % tiles_w) * TILE_W, tiles_h)


@triton.jit
def _pixels(ry, rx, sy0, sx0, H, W, DH, DW, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A ``ROWS x COLS`` block of the sub-lattice from ``(sy0, sx0)``,
    flattened: sub-lattice rows and columns, image rows and columns clamped
    to the image (safe addresses: what is read there is masked out of the
    softmax, or not stored), and whether each pixel is in the image."""
    p = tl.arange(0, ROWS * COLS)
    sy = sy0 + p // COLS
    sx = sx0 + p % COLS
    y = ry + sy * DH
    x = rx + sx * DW
    ok = (sy >= 0) & (sx >= 0) & (y < H) & (x < W)
    return sy, sx, tl.minimum(tl.maximum(y, 0), H - 1), tl.minimum(tl.maximum(x, 0), W - 1), ok


@triton.jit
def _load(base, y, x, ok, channels, C, sc, sh, TRANSPOSE: tl.constexpr, MASKED: tl.constexpr):
    """``(pixels, channels)`` of a planar map (channel stride ``sc``, row
    stride ``sh``, unit column stride), or ``(channels, pixels)`` with
    ``TRANSPOSE``. ``MASKED``: zeros outside the image and past C channels;
    otherwise (the loads inside the halo loops: no per-element predicates)
    whatever lies at the clamped pixel and channel, for the caller to mask
    out of the softmax or multiply by the other operand's zero channels."""
    if MASKED:
        if TRANSPOSE:
            return tl.load(base + channels[:, None] * sc + (y * sh + x)[None, :],
                           mask=(channels < C)[:, None] & ok[None, :], other=0.0)
        else:
            return tl.load(base + channels[None, :] * sc + (y * sh + x)[:, None],
                           mask=ok[:, None] & (channels < C)[None, :], other=0.0)
    else:
        channels = tl.minimum(channels, C - 1)
        if TRANSPOSE:
            return tl.load(base + channels[:, None] * sc + (y * sh + x)[None, :])
        else:
            return tl.load(base + channels[None, :] * sc + (y * sh + x)[:, None])


@triton.jit
def _store(base, tile, y, x, ok, channels, C, sc, sh):
    tl.store(base + channels[None, :] * sc + (y * sh + x)[:, None],
             tile.to(base.dtype.element_ty), mask=ok[:, None] & (channels < C)[None, :])


@triton.jit
def _tables(RR, RC, n, N, D, DR, KH, KW, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """``RowT, ColT`` ``(BLOCK_D, BLOCK_T)`` float32 of head n: ``RowT[d, t] =
    rel_row[t, n, d]`` for the row channels ``d < DR``, ``ColT[d, t] =
    rel_col[t, n, d - DR]`` for the column channels; zeros elsewhere."""
    d = tl.arange(0, BLOCK_D)[:, None]
    t = tl.arange(0, BLOCK_T)[None, :]
    row = tl.load(RR + (t * N + n) * DR + d, mask=(d < DR) & (t < KH), other=0.0)
    col = tl.load(RC + (t * N + n) * (D - DR) + (d - DR), mask=(d >= DR) & (d < D) & (t < KW),
                  other=0.0)
    return row.to(tl.float32), col.to(tl.float32)


@triton.jit
def _relative_terms(q, row_table, col_table):
    """``(A, B)``: each query's q.r terms per tap row and per tap column."""
    q32 = q.to(tl.float32)
    return (tl.dot(q32, row_table, input_precision='tf32x3'),
            tl.dot(q32, col_table, input_precision='tf32x3'))


@triton.jit
def _one_hot(ROWS: tl.constexpr, COLS: tl.constexpr, BY_ROW: tl.constexpr,
             TRANSPOSE: tl.constexpr):
    """``(16, ROWS * COLS)`` float32: 1 where the block's pixel (flattened
    index) lies on block row (``BY_ROW``) or column i; ``(ROWS * COLS, 16)``
    with ``TRANSPOSE``."""
    if TRANSPOSE:
        j = tl.arange(0, ROWS * COLS)[:, None]
        i = tl.arange(0, 16)[None, :]
    else:
        i = tl.arange(0, 16)[:, None]
        j = tl.arange(0, ROWS * COLS)[None, :]
    if BY_ROW:
        return tl.where(j // COLS == i, 1.0, 0.0)
    else:
        return tl.where(j % COLS == i, 1.0, 0.0)


@triton.jit
def _shifted(terms, first, q_first, q_ok, r, extent, dilation, LINES: tl.constexpr, TAPS,
             HAS_REL: tl.constexpr, BLOCK_T: tl.constexpr):
    """``(queries, 16)``: for each query, the term of each of the key
    block's rows (columns) ``first + i``, i < LINES, from its per-tap terms
    ``terms (queries, BLOCK_T)``; -1e30 where that line is outside the
    query's window, outside the image (residue ``r``, ``extent`` pixels,
    ``dilation``), or the query is not in the image (``q_ok``)."""
    i = tl.arange(0, 16)
    line = first + i
    line_ok = (i < LINES) & (line >= 0) & (r + line * dilation < extent)
    tap = line[None, :] - q_first[:, None] + (TAPS - 1) // 2
    ok = (tap >= 0) & (tap < TAPS) & line_ok[None, :] & q_ok[:, None]
    if HAS_REL:
        value = tl.gather(terms, tl.minimum(tl.maximum(tap, 0), BLOCK_T - 1), 1)
    else:
        value = tl.zeros(tap.shape, tl.float32)
    return tl.where(ok, value, -1e30)


@triton.jit
def _logits(q, kT, a_row, b_col, qy, qx, q_ok, ky0, kx0, ry, rx, H, W, DH, DW, KH, KW,
            ROWS: tl.constexpr, COLS: tl.constexpr, HAS_KEY: tl.constexpr,
            HAS_REL: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr):
    """Logits ``(queries, ROWS * COLS keys)`` in log2 units, of the queries
    at sub-lattice ``(qy, qx)`` and the key block from ``(ky0, kx0)``.

    ``q.k`` is one product. The q.r terms and the mask come in two more:
    each query's per-tap terms placed on the block's rows and columns
    (:func:`_shifted`, -1e30 outside its window or the image), spread over
    the block's keys by one-hot matrices (float32 accuracy). A masked key
    gets a logit below -1e30: its weight is exactly 0, as ``exp2`` of it
    minus any finite maximum underflows."""
    rows = _shifted(a_row, ky0, qy, q_ok, ry, H, DH, ROWS, KH, HAS_REL, BLOCK_T)
    cols = _shifted(b_col, kx0, qx, q_ok, rx, W, DW, COLS, KW, HAS_REL, BLOCK_T)
    s = tl.dot(rows, _one_hot(ROWS, COLS, True, False), input_precision='tf32x3')
    s += tl.dot(cols, _one_hot(ROWS, COLS, False, False), input_precision='tf32x3')
    if HAS_KEY:
        s += _dot(q, kT, UPCAST)
    return s * 1.4426950408889634


@triton.jit
def _taps_grad(ds, q_first, first, TAPS, BY_ROW: tl.constexpr, ROWS: tl.constexpr,
               COLS: tl.constexpr, BLOCK_T: tl.constexpr):
    """``ds (queries, ROWS * COLS keys)`` summed per tap row (``BY_ROW``) or
    tap column of each query, as ``(queries, BLOCK_T)``: summed over each
    block row (column) by a one-hot product, then shifted to the query's
    taps (``first``: the block's first row (column), ``q_first``: the
    queries')."""
    lines = tl.dot(ds, _one_hot(ROWS, COLS, BY_ROW, True), input_precision='tf32x3')
    t = tl.arange(0, BLOCK_T)[None, :]
    line = t + q_first[:, None] - (TAPS - 1) // 2 - first  # the block's line at tap t
    inside = (line >= 0) & (line < 16) & (t < TAPS)
    return tl.where(inside, tl.gather(lines, tl.minimum(tl.maximum(line, 0), 15), 1), 0.0)


@triton.jit
def _halo_blocks(KH, KW, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_W: tl.constexpr):
    """How many ``BLOCK_H x BLOCK_W`` blocks cover a tile's halo."""
    return tl.cdiv(TILE_H + KH - 1, BLOCK_H) * tl.cdiv(TILE_W + KW - 1, BLOCK_W)


@triton.jit
def _halo_block(block, KW, TILE_W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Offset (rows, columns) of halo block ``block`` from the halo's
    corner. One loop over the blocks, not two nested ones, so that nothing
    computed for a block row stays live (in registers) across the blocks."""
    per_row = tl.cdiv(TILE_W + KW - 1, BLOCK_W)
    return (block // per_row) * BLOCK_H, (block % per_row) * BLOCK_W


# ---------------------------------------------------------------------------
# Forward.


@_jit
def _forward_kernel(Q, K, V, RR, RC, OUT, LSE,
                    sqb, sqn, sqc, sqh, skb, skn, skc, skh, svb, svn, svc, svh,
                    sob, son, soc, soh,
                    H, W, N, D, DV, DR, KH, KW, DH, DW,
                    HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr, UPCAST: tl.constexpr,
                    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr):
    """Output and log-sum-exp (log2 units) of one tile of queries."""
    bn = tl.program_id(1).to(tl.int64)
    b = bn // N
    n = bn % N
    ry, rx, sy0, sx0, _ = _lattice_tile(tl.program_id(0), H, W, DH, DW, TILE_H, TILE_W)
    qy, qx, y, x, q_ok = _pixels(ry, rx, sy0, sx0, H, W, DH, DW, TILE_H, TILE_W)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load(Q + b * sqb + n * sqn, y, x, q_ok, d, D, sqc, sqh, False, True)
    a_row = tl.zeros([TILE_H * TILE_W, BLOCK_T], tl.float32)
    b_col = tl.zeros([TILE_H * TILE_W, BLOCK_T], tl.float32)
    if HAS_REL:
        row_table, col_table = _tables(RR, RC, n, N, D, DR, KH, KW, BLOCK_D, BLOCK_T)
        a_row, b_col = _relative_terms(q, row_table, col_table)
    K += b * skb + n * skn
    V += b * svb + n * svn
    # A finite start: keys that do not exist (-inf) give exp2(-inf - m) = 0.
    m = tl.full([TILE_H * TILE_W], -1e30, tl.float32)
    denom = tl.zeros([TILE_H * TILE_W], tl.float32)
    acc = tl.zeros([TILE_H * TILE_W, BLOCK_DV], tl.float32)
    top = sy0 - (KH - 1) // 2
    left = sx0 - (KW - 1) // 2
    for block in range(_halo_blocks(KH, KW, TILE_H, TILE_W, BLOCK_H, BLOCK_W)):
        hy, hx = _halo_block(block, KW, TILE_W, BLOCK_H, BLOCK_W)
        ky, kx, key_y, key_x, k_ok = _pixels(ry, rx, top + hy, left + hx, H, W, DH, DW,
                                             BLOCK_H, BLOCK_W)
        kT = tl.zeros([BLOCK_D, BLOCK_H * BLOCK_W], q.dtype)
        if HAS_KEY:
            kT = _load(K, key_y, key_x, k_ok, d, D, skc, skh, True, False)
        s = _logits(q, kT, a_row, b_col, qy, qx, q_ok, top + hy, left + hx, ry, rx, H, W, DH,
                    DW, KH, KW, BLOCK_H, BLOCK_W, HAS_KEY, HAS_REL, UPCAST, BLOCK_T)
        v = _load(V, key_y, key_x, k_ok, dv, DV, svc, svh, False, False)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        scale = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * scale + tl.sum(p, axis=1)
        acc = acc * scale[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m = m_new
    denom = tl.where(denom > 0, denom, 1.0)  # only pixels outside the image have 0
    _store(OUT + b * sob + n * son, acc / denom[:, None], y, x, q_ok, dv, DV, soc, soh)
    tl.store(LSE + (bn * H + y) * W + x, m + tl.log2(denom), mask=q_ok)


# ---------------------------------------------------------------------------
# Backward.


@_jit
def _backward_query_kernel(Q, K, V, RR, RC, DOUT, LSE, DELTA, DQ, DREL,
                           sqb, sqn, sqc, sqh, skb, skn, skc, skh, svb, svn, svc, svh,
                           sgb, sgn, sgc, sgh, sob, son, soc, soh,
                           H, W, N, D, DV, DR, KH, KW, DH, DW, tile_rows,
                           HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr, UPCAST: tl.constexpr,
                           TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                           BLOCK_T: tl.constexpr):
    """delta and dq of ``tile_rows`` tiles of queries (one above the other),
    and their tables' gradient, ``DREL[program] = (BLOCK_D, 2 * BLOCK_T)``."""
    bn = tl.program_id(1).to(tl.int64)
    b = bn // N
    n = bn % N
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    tiles_h = tl.cdiv(tl.cdiv(H, DH), TILE_H)
    tiles_w = tl.cdiv(tl.cdiv(W, DW), TILE_W)
    chunks = tl.cdiv(tiles_h, tile_rows)
    pid = tl.program_id(0)
    lattice = pid // (chunks * tiles_w)
    chunk = (pid // tiles_w) % chunks
    first_tile = lattice * tiles_h * tiles_w + chunk * tile_rows * tiles_w + pid % tiles_w
    K += b * skb + n * skn
    V += b * svb + n * svn
    row_table = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
    col_table = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
    if HAS_REL:
        row_table, col_table = _tables(RR, RC, n, N, D, DR, KH, KW, BLOCK_D, BLOCK_T)
    grad_row_table = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
    grad_col_table = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
    for r in range(0, tl.minimum(tile_rows, tiles_h - chunk * tile_rows)):
        ry, rx, sy0, sx0, _ = _lattice_tile(first_tile + r * tiles_w, H, W, DH, DW,
                                            TILE_H, TILE_W)
        qy, qx, y, x, q_ok = _pixels(ry, rx, sy0, sx0, H, W, DH, DW, TILE_H, TILE_W)
        q = _load(Q + b * sqb + n * sqn, y, x, q_ok, d, D, sqc, sqh, False, True)
        dout = _load(DOUT + b * sgb + n * sgn, y, x, q_ok, dv, DV, sgc, sgh, False, True)
        lse = tl.load(LSE + (bn * H + y) * W + x, mask=q_ok, other=0.0)
        a_row = tl.zeros([TILE_H * TILE_W, BLOCK_T], tl.float32)
        b_col = tl.zeros([TILE_H * TILE_W, BLOCK_T], tl.float32)
        if HAS_REL:
            a_row, b_col = _relative_terms(q, row_table, col_table)
        top = sy0 - (KH - 1) // 2
        left = sx0 - (KW - 1) // 2
        # Pass 1: delta_i = sum_j P_ij dP_ij (= dout_i . out_i).
        delta = tl.zeros([TILE_H * TILE_W], tl.float32)
        for block in range(_halo_blocks(KH, KW, TILE_H, TILE_W, BLOCK_H, BLOCK_W)):
            hy, hx = _halo_block(block, KW, TILE_W, BLOCK_H, BLOCK_W)
            ky, kx, key_y, key_x, k_ok = _pixels(ry, rx, top + hy, left + hx, H, W, DH, DW,
                                                 BLOCK_H, BLOCK_W)
            kT = tl.zeros([BLOCK_D, BLOCK_H * BLOCK_W], q.dtype)
            if HAS_KEY:
                kT = _load(K, key_y, key_x, k_ok, d, D, skc, skh, True, False)
            s = _logits(q, kT, a_row, b_col, qy, qx, q_ok, top + hy, left + hx, ry, rx, H, W,
                        DH, DW, KH, KW, BLOCK_H, BLOCK_W, HAS_KEY, HAS_REL, UPCAST, BLOCK_T)
            p = tl.exp2(s - lse[:, None])
            vT = _load(V, key_y, key_x, k_ok, dv, DV, svc, svh, True, False)
            delta += tl.sum(p * _dot(dout, vT, UPCAST), axis=1)
        tl.store(DELTA + (bn * H + y) * W + x, delta, mask=q_ok)
        # Pass 2: dS = P (dP - delta); dq = dS @ K (+ the tables' share).
        dq = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
        grad_a = tl.zeros([TILE_H * TILE_W, BLOCK_T], tl.float32)
        grad_b = tl.zeros([TILE_H * TILE_W, BLOCK_T], tl.float32)
        for block in range(_halo_blocks(KH, KW, TILE_H, TILE_W, BLOCK_H, BLOCK_W)):
            hy, hx = _halo_block(block, KW, TILE_W, BLOCK_H, BLOCK_W)
            ky, kx, key_y, key_x, k_ok = _pixels(ry, rx, top + hy, left + hx, H, W, DH, DW,
                                                 BLOCK_H, BLOCK_W)
            kT = tl.zeros([BLOCK_D, BLOCK_H * BLOCK_W], q.dtype)
            if HAS_KEY:
                kT = _load(K, key_y, key_x, k_ok, d, D, skc, skh, True, False)
            s = _logits(q, kT, a_row, b_col, qy, qx, q_ok, top + hy, left + hx, ry, rx, H, W,
                        DH, DW, KH, KW, BLOCK_H, BLOCK_W, HAS_KEY, HAS_REL, UPCAST, BLOCK_T)
            p = tl.exp2(s - lse[:, None])
            vT = _load(V, key_y, key_x, k_ok, dv, DV, svc, svh, True, False)
            ds = p * (_dot(dout, vT, UPCAST) - delta[:, None])
            if HAS_KEY:
                dq += _dot(ds.to(kT.dtype), tl.trans(kT), UPCAST)
            if HAS_REL:
                grad_a += _taps_grad(ds, qy, top + hy, KH, True, BLOCK_H, BLOCK_W, BLOCK_T)
                grad_b += _taps_grad(ds, qx, left + hx, KW, False, BLOCK_H, BLOCK_W, BLOCK_T)
        if HAS_REL:
            dq += tl.dot(grad_a, tl.trans(row_table), input_precision='tf32x3')
            dq += tl.dot(grad_b, tl.trans(col_table), input_precision='tf32x3')
            q32 = tl.trans(q.to(tl.float32))
            grad_row_table += tl.dot(q32, grad_a, input_precision='tf32x3')
            grad_col_table += tl.dot(q32, grad_b, input_precision='tf32x3')
        _store(DQ + b * sob + n * son, dq, y, x, q_ok, d, D, soc, soh)
    if HAS_REL:
        program = bn * tl.num_programs(0) + pid
        t = tl.arange(0, BLOCK_T)[None, :]
        base = DREL + program * BLOCK_D * 2 * BLOCK_T + d[:, None] * 2 * BLOCK_T
        tl.store(base + t, grad_row_table)
        tl.store(base + BLOCK_T + t, grad_col_table)


@_jit
def _backward_key_kernel(Q, K, V, RR, RC, DOUT, LSE, DELTA, DK, DV_,
                         sqb, sqn, sqc, sqh, skb, skn, skc, skh, svb, svn, svc, svh,
                         sgb, sgn, sgc, sgh, sob, son, soc, soh, swb, swn, swc, swh,
                         H, W, N, D, DV, DR, KH, KW, DH, DW,
                         HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr, UPCAST: tl.constexpr,
                         TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    """dk and dv of one tile of keys, from the queries whose windows cover
    them: ``dV = P^T @ dO``, ``dK = dS^T @ Q`` (strides ``so*`` of dK,
    ``sw*`` of dV)."""
    bn = tl.program_id(1).to(tl.int64)
    b = bn // N
    n = bn % N
    ry, rx, sy0, sx0, _ = _lattice_tile(tl.program_id(0), H, W, DH, DW, TILE_H, TILE_W)
    ky, kx, key_y, key_x, k_ok = _pixels(ry, rx, sy0, sx0, H, W, DH, DW, TILE_H, TILE_W)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kT = tl.zeros([BLOCK_D, TILE_H * TILE_W], DOUT.dtype.element_ty)
    if HAS_KEY:
        kT = _load(K + b * skb + n * skn, key_y, key_x, k_ok, d, D, skc, skh, True, True)
    vT = _load(V + b * svb + n * svn, key_y, key_x, k_ok, dv, DV, svc, svh, True, True)
    row_table = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
    col_table = tl.zeros([BLOCK_D, BLOCK_T], tl.float32)
    if HAS_REL:
        row_table, col_table = _tables(RR, RC, n, N, D, DR, KH, KW, BLOCK_D, BLOCK_T)
    Q += b * sqb + n * sqn
    DOUT += b * sgb + n * sgn
    dk = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    dval = tl.zeros([TILE_H * TILE_W, BLOCK_DV], tl.float32)
    # Query q reads key k when k - q + pad lies in the window: the queries
    # from KH - 1 - pad rows above the tile to pad rows below it.
    top = sy0 - (KH - 1 - (KH - 1) // 2)
    left = sx0 - (KW - 1 - (KW - 1) // 2)
    for block in range(_halo_blocks(KH, KW, TILE_H, TILE_W, BLOCK_H, BLOCK_W)):
        hy, hx = _halo_block(block, KW, TILE_W, BLOCK_H, BLOCK_W)
        qy, qx, y, x, q_ok = _pixels(ry, rx, top + hy, left + hx, H, W, DH, DW,
                                     BLOCK_H, BLOCK_W)
        q = _load(Q, y, x, q_ok, d, D, sqc, sqh, False, False)
        dout = _load(DOUT, y, x, q_ok, dv, DV, sgc, sgh, False, False)
        pixel = (bn * H + y) * W + x
        lse = tl.load(LSE + pixel)
        a_row = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_T], tl.float32)
        b_col = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_T], tl.float32)
        if HAS_REL:
            a_row, b_col = _relative_terms(q, row_table, col_table)
        s = _logits(q, kT, a_row, b_col, qy, qx, q_ok, sy0, sx0, ry, rx, H, W, DH, DW, KH, KW,
                    TILE_H, TILE_W, HAS_KEY, HAS_REL, UPCAST, BLOCK_T)
        p = tl.exp2(s - lse[:, None])  # (queries, keys)
        dval += _dot(tl.trans(p.to(dout.dtype)), dout, UPCAST)
        if HAS_KEY:
            delta = tl.load(DELTA + pixel)
            ds = p * (_dot(dout, vT, UPCAST) - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    _store(DV_ + b * swb + n * swn, dval, key_y, key_x, k_ok, dv, DV, swc, swh)
    if HAS_KEY:
        _store(DK + b * sob + n * son, dk, key_y, key_x, k_ok, d, D, soc, soh)


# ---------------------------------------------------------------------------
# Launches.


def _check_head_widths(query, value) -> None:
    for name, width in (('query/key', query.shape[2]), ('value', value.shape[2])):
        if width > MAX_HEAD_DIM:
            raise ValueError(f"impl='triton' supports head widths (dim 2 of the (B, N, D, H, "
                             f"W) inputs) from 1 to {MAX_HEAD_DIM}; the {name} head width "
                             f"is {width}. Use more heads, or impl='torch'")


def _on_device(tensor):
    """Makes ``tensor``'s CUDA device current while kernels are launched:
    Triton launches on the current device (and its current stream), which
    need not be the tensor's. A no-op context for CPU tensors (interpreter)."""
    if tensor.device.type != 'cuda':
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _planar(t):
    """``t`` with a unit column stride (the layout the kernels address; any
    other strides), copying only if needed."""
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _strides(t) -> tuple:
    """Batch, head, channel and row strides."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _grid_tiles(height, width, dilation) -> int:
    dh, dw = dilation
    sub_h, sub_w = triton.cdiv(height, dh), triton.cdiv(width, dw)
    return dh * dw * triton.cdiv(sub_h, TILE_H) * triton.cdiv(sub_w, TILE_W)


def _launch_args(query, key, value, rel_row, rel_col, window, dilation) -> tuple:
    """Tensors, strides, geometry and constexprs shared by the launches."""
    _, heads, dim, _, _ = query.shape
    has_key, has_rel = key is not None, rel_row is not None
    if not has_rel:  # never read without HAS_REL
        rel_row = rel_col = query
    tensors = (query, key if has_key else query, value, rel_row.contiguous(),
               rel_col.contiguous())
    strides = (*_strides(query), *_strides(tensors[1]), *_strides(value))
    dim_row = rel_row.shape[-1] if has_rel else 0
    geometry = (*query.shape[3:], heads, dim, value.shape[2], dim_row, *window, *dilation)
    flags = dict(HAS_KEY=has_key, HAS_REL=has_rel,
                 UPCAST=INTERPRETED and query.dtype == torch.bfloat16,
                 **block_config(dim, value.shape[2], window), **LAUNCH_OPTIONS)
    return tensors, strides, geometry, flags


def forward(query, key, value, rel_row, rel_col, window, dilation, keep_attention):
    """Returns ``(out, lse)``: out in v's dtype, lse ``(B, N, H, W)`` float32
    (log2 units). ``keep_attention`` is ignored: the map is never stored."""
    _check_head_widths(query, value)
    batch, heads, _, height, width = query.shape
    query, value = _planar(query), _planar(value)
    key = None if key is None else _planar(key)
    out = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    lse = torch.empty((batch, heads, height, width), dtype=torch.float32, device=query.device)
    tensors, strides, geometry, flags = _launch_args(query, key, value, rel_row, rel_col,
                                                     window, dilation)
    with _on_device(query):
        _forward_kernel[(_grid_tiles(height, width, dilation), batch * heads)](
            *tensors, out, lse, *strides, *_strides(out), *geometry, **flags)
    return out, lse


def backward(grad_out, out, lse, query, key, value, rel_row, rel_col, window, dilation,
             grad_query, grad_key, grad_value):
    """Writes dq, dk, dv into the given buffers; returns the tables'
    gradients in float32 (None without tables). ``out`` is not read (the
    kernels recompute what they need from ``lse``): it may be None."""
    _check_head_widths(query, value)
    batch, heads, dim, height, width = query.shape
    query, value, grad_out = _planar(query), _planar(value), _planar(grad_out)
    key = None if key is None else _planar(key)
    tensors, strides, geometry, flags = _launch_args(query, key, value, rel_row, rel_col,
                                                     window, dilation)
    has_rel = rel_row is not None
    # The kernels write the given buffers when their columns are contiguous
    # (as the layer's packed ones are), others a copy.
    buffers = (grad_query, grad_key, grad_value)
    grad_q, grad_k, grad_v = [None if t is None else _planar(t) for t in buffers]
    delta = torch.empty((batch, heads, height, width), dtype=torch.float32,
                        device=query.device)
    dh, dw = dilation
    tiles_h = triton.cdiv(triton.cdiv(height, dh), TILE_H)
    tiles_w = triton.cdiv(triton.cdiv(width, dw), TILE_W)
    tile_rows = 1
    if has_rel:  # a column of tiles per program: few partial sums of the tables
        tile_rows = triton.cdiv(tiles_h * tiles_w * dh * dw, MAX_TABLE_PARTIALS)
    query_grid = (dh * dw * tiles_w * triton.cdiv(tiles_h, tile_rows), batch * heads)
    block_d, block_t = flags['BLOCK_D'], flags['BLOCK_T']
    partial = torch.empty((batch * heads * query_grid[0], block_d, 2 * block_t) if has_rel
                          else (1,), dtype=torch.float32, device=query.device)
    with _on_device(query):
        _backward_query_kernel[query_grid](
            *tensors, grad_out, lse, delta, grad_q, partial, *strides, *_strides(grad_out),
            *_strides(grad_q), *geometry, tile_rows, **flags)
        grad_k = grad_q if grad_k is None else grad_k  # never written without HAS_KEY
        _backward_key_kernel[(_grid_tiles(height, width, dilation), batch * heads)](
            *tensors, grad_out, lse, delta, grad_k, grad_v, *strides, *_strides(grad_out),
            *_strides(grad_k), *_strides(grad_v), *geometry, **flags)
    for buffer, written in zip(buffers, (grad_q, grad_k, grad_v)):
        if buffer is not None and written is not buffer:
            buffer.copy_(written)
    if not has_rel:
        return None, None
    kh, kw = window
    dim_row = rel_row.shape[-1]
    # (B * N * programs, BLOCK_D, 2 * BLOCK_T) -> (N, BLOCK_D, 2, BLOCK_T), in a fixed order
    sums = partial.view(batch, heads, query_grid[0], block_d, 2, block_t).sum(dim=(0, 2))
    grad_rel_row = sums[:, :dim_row, 0, :kh].permute(2, 0, 1)  # (kh, N, Dr)
    grad_rel_col = sums[:, dim_row:dim, 1, :kw].permute(2, 0, 1)  # (kw, N, Dc)
    return grad_rel_row.contiguous(), grad_rel_col.contiguous()


# ---------------------------------------------------------------------------
# For compile checks without a GPU (tools/analysis): what a launch compiles.

KERNELS = ('_forward_kernel', '_backward_query_kernel', '_backward_key_kernel')
_FLOAT32_POINTERS = ('RR', 'RC', 'LSE', 'DELTA', 'DREL')
_TRITON_DTYPES = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}


def compile_source_args(kernel: str, dtype: torch.dtype, head_dim: int, value_dim: int = None,
                        window=(7, 7), has_key: bool = True, has_rel: bool = True) -> tuple:
    """``(fn, signature, constexprs, attrs, options)`` for
    ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget('cuda', arch, 32), options=options)``, specialised as a
    launch on a GPU specialises it: 16-byte-aligned pointers (PyTorch's
    allocations and the layer's packed q, k, v are), every int a runtime
    i32 (``do_not_specialize``: one compile for every map size and stride).

    Example:
        >>> fn, sig, consts, attrs, opts = compile_source_args('_forward_kernel',
        ...                                                    torch.bfloat16, 32)
    """
    fn = globals()[kernel]
    value_dim = head_dim if value_dim is None else value_dim
    constexprs = dict(HAS_KEY=has_key, HAS_REL=has_rel, UPCAST=False,
                      **block_config(head_dim, value_dim, window))
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = 'constexpr'
        elif name in _RUNTIME_INTS:
            signature[name] = 'i32'
        else:
            signature[name] = '*fp32' if name in _FLOAT32_POINTERS else \
                f'*{_TRITON_DTYPES[dtype]}'
            attrs[(index, )] = [['tt.divisibility', 16]]
    return fn, signature, constexprs, attrs, dict(LAUNCH_OPTIONS)
