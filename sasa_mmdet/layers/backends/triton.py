"""Triton backend: fused local attention on tensor cores, forward and backward.

The kernels work the way fused neighbourhood attention does (NATTEN's FNA,
FlashAttention-2), with SASA's exact semantics: logits ``q.k + q.r`` (no
scaling), neighbours outside the image masked out of the softmax (they do
not exist; they are not zeros), the softmax in float32.

Tiles and halo. A program owns a ``TILE_H x TILE_W`` (8 x 8) tile of pixels
of one image and head. The keys its queries' windows cover form the halo,
``(8 + kh - 1) x (8 + kw - 1)`` pixels, which the program walks in blocks of
``BLOCK_H x 16`` keys (``BLOCK_H`` 4 rows at head widths up to 32, 2 at
64, 1 at 128: :func:`block_config`; 8 in the forward and query kernels
in half precision at narrow heads: :func:`kernel_config`), with an online softmax across
the blocks. Per block it loads K and V once and runs ``S = Q @ K_block^T``
and ``O += P @ V_block`` as ``tl.dot`` on tensor cores (head widths padded
to at least 16); each query is masked to its own window and the image. The
extra products over the halo cost less than gathering each query's own
window would. With dilation ``(dh, dw)`` a tile takes queries on one
sub-lattice (rows ``= r mod dh``, columns ``= c mod dw``), whose neighbours
lie on the same sub-lattice: dilated attention is dense attention on a
subsampled grid, at the same cost. Four warps per program, one stage; at
head widths of 32 and more the backward query and tables kernels walk
their halo in smaller blocks, and at 128 the query kernel runs eight warps
(:func:`kernel_config`): otherwise they spill registers.

The q.r term and the mask. ``A = Q @ RowT`` and ``B = Q @ ColT``
(``RowT[d, t] = rel_row[t, n, d]`` on the row part of the channels,
``ColT`` on the column part; per tile) give every query's term for every
tap row and tap column. A ``tl.gather`` places them on the rows and columns
of the tile's halo, ``(queries, 16)`` each, with -1e30 where the row or
column is outside the query's window or the image; per halo block, two
products with one-hot matrices spread them over the block's keys. So no
per-pixel map of relative positions is built, and the mask costs no
per-key comparisons. A masked key's logit is below -1e30: its weight is
exactly 0.

Backward, like FlashAttention-2's, recomputing ``P`` from the stored
log-sum-exp, with ``delta_i = dout_i . out_i`` from the forward's output
(read, not saved: the layer keeps an alias of it and passes it only while
no in-place op has changed it, so a ReLU applied in place after a layer
without bias still gets right gradients), in two kernels launched one
after the other:

- query kernel (owns query tiles, a column of them per program with
  tables): delta (stored), then one walk over the halo for ``dQ = dS @
  K``, ``dS = P (dP - delta)``; with tables the same walk also sums ``dS``
  per halo row and column (one-hot products), shifts those to each query's
  taps (``dA``, ``dB``), adds ``dA @ RowT^T + dB @ ColT^T`` to dQ and
  accumulates ``Q^T @ [dA | dB]`` into one ``(D, 2 x taps)`` partial sum
  per program, which ``torch.sum`` reduces in a fixed order (a few MB; not
  O(D^2) per pixel). With tables this is the kernel called
  ``_backward_tables_kernel``, otherwise ``_backward_query_kernel``;
- key kernel (owns key tiles): visits the queries whose windows cover its
  keys (the same halo, seen from the key side): ``dV = P^T @ dO``, ``dK =
  dS^T @ Q``.

Where the merged kernel would spill registers (planar maps at head widths
over 32, tf32 at over 32: :func:`tables_kernel_owns_dq`), and when the
output was modified in place, three kernels run: ``_backward_query_kernel``
(delta from the output, or without it from a first walk over the halo as
``sum_j P_ij dP_ij``; then the q.k share of dQ), ``_backward_tables_kernel``
(another walk: the tables' share, added to that dQ, and their gradient)
and the key kernel. No reduction uses atomics: the gradients are
bit-reproducible run to run.

Precision. Half-precision inputs enter ``tl.dot`` as they are (P and dS are
rounded to the input dtype for their products, as FlashAttention's are).
Products with a float32 operand split it into high and low parts: the
one-hot products into two tf32 products (exact one-hot, about 2^-21 of the
terms; for half-precision inputs the tables kernel's sums of dS per halo
row and column take one, dS to 2^-11), products with the tables into
half-precision (or bfloat16) parts, float32 inputs into three tf32
products (``_dot_f32``: ``tf32x3``'s accuracy in fewer registers than
Triton's lowering of it), or, when torch allows tf32 for float32 matrix
products (``torch.set_float32_matmul_precision('high')`` or
``'medium'``), one tf32 product each (``PRODUCTS == 2``: 10-bit mantissas,
as cuDNN's tf32 convolutions; the one-hot products too). In the
three-kernel backward in half precision, the tables kernel adds its share
to a dQ already rounded to the input dtype (one more rounding). Loads
inside the halo loops are not masked (addresses clamped to the image,
channels to the head width): what they read outside is masked out of the
softmax or meets the other operand's zero channels.

Head widths: D and Dv up to 128 (:data:`MAX_HEAD_DIM`; larger ones are
refused). Window and dilation any size, as runtime arguments (a window
wider than 16 taps compiles a wider tap table). Map sizes and strides are
not specialised (``do_not_specialize``), so one compile serves every
feature-map size: the compiles per run are the (dtype, padded head width
and whether it is full, window size class, logit terms, layout)
combinations the model uses, times three kernels (forward, query or
tables, key; plus the two kernels of the in-place fallback if an output
is modified in place).

Layouts. The kernels address the ``(B, N, D, H, W)`` maps in one of two
layouts (``CHANNELS_LAST``, chosen per call by :func:`channels_last`):
channels-last, as the layer's projection writes q, k, v for these
kernels, whatever its input's layout, at head widths that are multiples of
``VECTOR`` (``(B, H, W, 3, N, D)`` in memory:
``local_attention_ops.channels_last_projection``): each pixel's D
channels are contiguous and 16-byte aligned (strides handed over in units
of ``VECTOR`` elements, so the compiler knows it), read and written with
128-bit vector loads and stores; the output, dq, dk and dv are written in
the same layout. Or planar, with a unit column stride (the projection of
a contiguous input at other head widths): its rows are not aligned, so
every element is loaded on its own address. At head widths that fill their block (16, 32, 64, 128:
``EVEN``) no channel is masked or clamped.

What is not fast: planar maps are not vectorised, nor are channels-last
ones at head widths that do not fill their block (8, 24, ...: their halo
loads clamp the channels); no ``cp.async``/TMA; the halo of a
3 x 3 window wastes most of its products; the halo blocks are not
software-pipelined; the kernels use up to 255 registers (two programs per
SM). No kernel spills registers in bfloat16 or float16 at head widths up
to 64 on sm_80 and sm_90, except the key kernel on sm_80 at 64
channels-last (16-24 B); in tf32 the tables kernel does at 64 on sm_90
(152-240 B) and the key kernel at 16 channels-last on sm_80 (16 B); at 128
the tables kernel does, and float32 at full accuracy (three products each)
spills at every width (tools/analysis_tools/check_triton_kernels.py reports
which). The key
kernel runs mma.sync (HMMA), not wgmma, at head widths 64 and 128 (its
query blocks are then under 64 rows).

``TRITON_INTERPRET=1`` set before import runs the kernels on CPU tensors.
The interpreter computes ``tl.dot`` on bfloat16 wrongly (Triton 3.8), so
under it every product's operands are upcast to float32 first (their
rounding to bfloat16 or float16 is kept); GPUs multiply them directly.
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
# Head widths of 32 and more: the backward tables kernel walks its halo in
# blocks of half as many rows, the query kernel in blocks of at most 2 rows
# (and at 128 runs 8 warps); otherwise they spill registers.
WIDE_HEAD = 32
# Half-precision inputs: the forward kernel at head widths up to 16 (32
# channels-last) and the backward query kernel up to 16 walk their halo in
# blocks of this many rows, half the steps of 4-row blocks for the same
# keys (each step has fixed work: the running maximum's rescaling,
# barriers); other kernels, wider heads and float32 inputs would spill
# registers.
TALL_BLOCK_H = 8
# The tables kernel's programs each take tiles one above the other (up to a
# whole column of them), so that their partial sums of the tables' gradient
# take about this many bytes at most (more only when one program per column
# of tiles exceeds it).
TABLE_PARTIAL_BYTES = 32 << 20
# Channels-last maps: strides in units of this many elements (16 bytes of
# bfloat16), the width of their vector loads (``channels_last``).
VECTOR = 8
# The softmax runs in base 2: exp(s) = exp2(s * LOG2E), the scale fused into
# the subtraction of the maximum (one FFMA a logit).
LOG2E = tl.constexpr(1.4426950408889634)
INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'

# Map sizes and strides change with every feature map: one compile for all.
_RUNTIME_INTS = ['H', 'W', 'N', 'D', 'DV', 'DR', 'KH', 'KW', 'DH', 'DW', 'tile_rows'] + [
    f's{tensor}{dim}' for tensor in 'qkvogwf' for dim in 'bnchw']


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in names if n in _RUNTIME_INTS])


def kernel_config(kernel: str, blocks: dict, element_size: int = 2,
                  channels_last_layout: bool = False) -> tuple:
    """``(constexprs, options)`` of ``kernel`` for inputs of ``element_size``
    bytes in the given layout: the :func:`block_config` ``blocks`` and
    ``LAUNCH_OPTIONS``, adjusted per kernel (``TALL_BLOCK_H``,
    ``WIDE_HEAD``)."""
    blocks, options = dict(blocks), dict(LAUNCH_OPTIONS)
    width = max(blocks['BLOCK_D'], blocks['BLOCK_DV'])
    if width >= WIDE_HEAD and kernel == '_backward_tables_kernel':
        blocks['BLOCK_H'] = max(1, blocks['BLOCK_H'] // 2)
    tall = dict(_forward_kernel=WIDE_HEAD if channels_last_layout else WIDE_HEAD // 2,
                _backward_query_kernel=WIDE_HEAD // 2).get(kernel, 0)
    if element_size == 2 and width <= tall:
        blocks['BLOCK_H'] = TALL_BLOCK_H
    if width >= WIDE_HEAD and kernel == '_backward_query_kernel':
        blocks['BLOCK_H'] = min(blocks['BLOCK_H'], 2)
        if width >= 128:
            options['num_warps'] = 8
    return blocks, options


def tables_kernel_owns_dq(element_size: int, width: int, channels_last_layout: bool) -> bool:
    """Whether, given the forward's output, the backward tables kernel
    takes on the query kernel's work (delta and all of dq: one walk over
    the halo, not two): in half precision for channels-last maps and for
    planar ones at head widths up to 32; in tf32 for channels-last maps at
    head widths up to 32 (``width``: the wider padded one of q's and v's).
    Elsewhere its dq accumulator spilled registers on sm_90 (12-264 bytes).
    """
    if element_size == 2:
        return channels_last_layout or width <= WIDE_HEAD
    return channels_last_layout and width <= WIDE_HEAD


def block_config(head_dim: int, value_dim: int, window=(7, 7), element_size: int = 2) -> dict:
    """Block sizes for head widths ``head_dim`` (q, k), ``value_dim`` (v),
    ``window`` and inputs of ``element_size`` bytes: widths padded to a
    power of two of at least 16 (the smallest ``tl.dot`` operand), taps
    likewise; halo blocks of 4, 2 or 1 rows, so that a block's loads stay
    at ``HALO_ELEMENTS`` 16-bit numbers."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(value_dim))
    block_h = max(1, min(4, 2 * HALO_ELEMENTS // (BLOCK_W * max(block_d, block_dv)
                                                  * element_size)))
    halo = max(TILE_H, TILE_W) + max(window) - 1
    return dict(TILE_H=TILE_H, TILE_W=TILE_W, BLOCK_H=block_h, BLOCK_W=BLOCK_W,
                BLOCK_D=block_d, BLOCK_DV=block_dv,
                BLOCK_T=max(16, triton.next_power_of_2(max(window))),
                BLOCK_HALO=max(16, triton.next_power_of_2(halo)))


# ---------------------------------------------------------------------------
# Pieces shared by the kernels.


@triton.jit
def _dot(a, b, PRODUCTS: tl.constexpr, acc=None):
    """``acc + a @ b`` (float32; ``acc`` None: zeros): half-precision
    operands as they are, float32 ones as :func:`_dot_f32` makes them.
    ``PRODUCTS``: 0 (exact), 1 (under the interpreter, whose bfloat16
    products are wrong: operands upcast) or 2 (float32 operands as one tf32
    product).

    Sums of several products (high and low parts, the one-hot pairs) add
    through ``acc`` (the tensor cores add into it), not with ``+``: Triton
    folds ``x + tl.dot(a, b)`` into the accumulator only for a lone
    product, so each such ``+`` costs a float add per element."""
    if PRODUCTS == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        return _dot_f32(a, b, PRODUCTS, acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tf32_high(a):
    """``a`` cut to tf32's 10-bit mantissa (exact in a tf32 product)."""
    return (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot_f32(a, b, PRODUCTS: tl.constexpr, acc=None):
    """``acc + a @ b`` of float32 operands to about float32 accuracy, as
    three tf32 products of their high and low parts (what ``tf32x3`` does,
    in fewer registers than Triton's lowering of it); one tf32 product
    (10-bit mantissas) with ``PRODUCTS == 2``."""
    if PRODUCTS == 2:
        return tl.dot(a, b, acc, input_precision='tf32')
    a_high = _tf32_high(a)
    b_high = _tf32_high(b)
    acc = tl.dot(a_high, b_high, acc, input_precision='tf32')
    acc = tl.dot(a_high, b - b_high, acc, input_precision='tf32')
    return tl.dot(a - a_high, b_high, acc, input_precision='tf32')


@triton.jit
def _dot_one_hot(a, one_hot, PRODUCTS: tl.constexpr, acc=None):
    """``acc + a @ one_hot`` for float32 ``a`` and a 0/1 matrix, to about
    2^-21 of ``a``: two tf32 products, of ``a`` cut to tf32 (exact) and of
    the rest (cheaper in registers and instructions than ``tf32x3``, which
    also splits the exact one-hot operand)."""
    if PRODUCTS == 2:
        return tl.dot(a, one_hot, acc, input_precision='tf32')
    high = _tf32_high(a)
    acc = tl.dot(high, one_hot, acc, input_precision='tf32')
    return tl.dot(a - high, one_hot, acc, input_precision='tf32')


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
def _layout(sb, sn, sc, sh, sw, CHANNELS_LAST: tl.constexpr):
    """A map's strides (batch, head, channel, row, column) in elements, as
    the kernels address it. Channels-last maps (channel stride 1) get
    theirs in units of ``VECTOR`` elements, so that the compiler knows
    every pixel's channels start 16-byte aligned (vector loads); planar
    maps have a unit column stride."""
    if CHANNELS_LAST:  # units of VECTOR elements
        return sb * 8, sn * 8, 1, sh * 8, sw * 8
    else:
        return sb, sn, sc, sh, 1


@triton.jit
def _offsets(y, x, channels, sc, sh, sw, TRANSPOSE: tl.constexpr):
    """``(pixels, channels)`` element offsets, or ``(channels, pixels)``
    with ``TRANSPOSE``."""
    if TRANSPOSE:
        return channels[:, None] * sc + (y * sh + x * sw)[None, :]
    else:
        return channels[None, :] * sc + (y * sh + x * sw)[:, None]


@triton.jit
def _tile_mask(ok, channels, C, EVEN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
               TRANSPOSE: tl.constexpr):
    """Pixels in the image and channels below C, shaped as :func:`_offsets`.
    A mask constant along runs of channels keeps channels-last loads and
    stores vectorised: with ``EVEN`` (C is the block's width) it is the
    pixels' alone; channels-last, C is a multiple of ``VECTOR``, and the
    compiler is told so."""
    if CHANNELS_LAST:
        C = (C // 8) * 8  # = C (VECTOR)
    if TRANSPOSE:
        if EVEN:
            mask = tl.broadcast_to(ok[None, :], (channels.shape[0], ok.shape[0]))
        else:
            mask = (channels < C)[:, None] & ok[None, :]
    else:
        if EVEN:
            mask = tl.broadcast_to(ok[:, None], (ok.shape[0], channels.shape[0]))
        else:
            mask = ok[:, None] & (channels < C)[None, :]
    return mask


@triton.jit
def _load(base, y, x, ok, channels, C, sc, sh, sw, TRANSPOSE: tl.constexpr,
          MASKED: tl.constexpr, EVEN: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """``(pixels, channels)`` of a map (strides from :func:`_layout`), or
    ``(channels, pixels)`` with ``TRANSPOSE``. ``MASKED``: zeros outside
    the image and past C channels; otherwise (the loads inside the halo
    loops: no per-pixel predicates) whatever lies at the clamped pixel, for
    the caller to mask out of the softmax, and channels past C clamped
    (planar) or zero (channels-last: masked, vectorised), for the other
    operand's zero channels to meet. ``EVEN``: C is the block's width."""
    if MASKED:
        tile = tl.load(base + _offsets(y, x, channels, sc, sh, sw, TRANSPOSE), other=0.0,
                       mask=_tile_mask(ok, channels, C, EVEN, CHANNELS_LAST, TRANSPOSE))
    elif EVEN:
        tile = tl.load(base + _offsets(y, x, channels, sc, sh, sw, TRANSPOSE))
    elif CHANNELS_LAST:
        tile = tl.load(base + _offsets(y, x, channels, sc, sh, sw, TRANSPOSE), other=0.0,
                       mask=_tile_mask(tl.full(ok.shape, True, tl.int1), channels, C, EVEN,
                                       CHANNELS_LAST, TRANSPOSE))
    else:
        channels = tl.minimum(channels, C - 1)
        tile = tl.load(base + _offsets(y, x, channels, sc, sh, sw, TRANSPOSE))
    return tile


@triton.jit
def _store(base, tile, y, x, ok, channels, C, sc, sh, sw, EVEN: tl.constexpr,
           CHANNELS_LAST: tl.constexpr):
    tl.store(base + _offsets(y, x, channels, sc, sh, sw, False),
             tile.to(base.dtype.element_ty),
             mask=_tile_mask(ok, channels, C, EVEN, CHANNELS_LAST, False))


@triton.jit
def _tables(RR, RC, n, N, D, DR, KH, KW, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
            TRANSPOSE: tl.constexpr = False, d0=0):
    """``RowT, ColT`` ``(BLOCK_D, BLOCK_T)`` float32 of head n, channels
    ``d0 + i``: ``RowT[i, t] = rel_row[t, n, d]`` for the row channels ``d <
    DR``, ``ColT[i, t] = rel_col[t, n, d - DR]`` for the column channels;
    zeros elsewhere. ``(BLOCK_T, BLOCK_D)`` with ``TRANSPOSE``."""
    if TRANSPOSE:
        d = d0 + tl.arange(0, BLOCK_D)[None, :]
        t = tl.arange(0, BLOCK_T)[:, None]
    else:
        d = d0 + tl.arange(0, BLOCK_D)[:, None]
        t = tl.arange(0, BLOCK_T)[None, :]
    row = tl.load(RR + (t * N + n) * DR + d, mask=(d < DR) & (t < KH), other=0.0)
    col = tl.load(RC + (t * N + n) * (D - DR) + (d - DR), mask=(d >= DR) & (d < D) & (t < KW),
                  other=0.0)
    return row.to(tl.float32), col.to(tl.float32)


@triton.jit
def _dot_exact_by_f32(x, b, PRODUCTS: tl.constexpr, acc=None):
    """``acc + x @ b`` for ``x`` exact in its dtype and float32 ``b``:
    float32 ``x`` by :func:`_dot_f32`, half-precision ``x`` by two
    half-precision products, with the high and low parts of ``b`` (16 or
    more bits)."""
    if x.dtype == tl.float32:
        return _dot_f32(x, b, PRODUCTS, acc)
    else:
        high = b.to(x.dtype)
        acc = _dot(x, high, PRODUCTS, acc)
        return _dot(x, (b - high.to(tl.float32)).to(x.dtype), PRODUCTS, acc)


@triton.jit
def _dot_f32_by_bf16(a, b, PRODUCTS: tl.constexpr, acc=None):
    """``acc + a @ b`` of float32 operands to about 2^-16, as three bfloat16
    products of their high and low parts (bfloat16: float32's range)."""
    a_high = a.to(tl.bfloat16)
    b_high = b.to(tl.bfloat16)
    a_low = (a - a_high.to(tl.float32)).to(tl.bfloat16)
    b_low = (b - b_high.to(tl.float32)).to(tl.bfloat16)
    acc = _dot(a_high, b_high, PRODUCTS, acc)
    acc = _dot(a_high, b_low, PRODUCTS, acc)
    return _dot(a_low, b_high, PRODUCTS, acc)


@triton.jit
def _relative_terms(q, row_table, col_table, PRODUCTS: tl.constexpr):
    """``(A, B)``: each query's q.r terms per tap row and per tap column."""
    return _dot_exact_by_f32(q, row_table, PRODUCTS), _dot_exact_by_f32(q, col_table, PRODUCTS)


@triton.jit
def _one_hot(first, LINES: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
             BY_ROW: tl.constexpr, TRANSPOSE: tl.constexpr):
    """``(LINES, ROWS * COLS)`` float32: 1 where the block's pixel (flattened
    index j) lies on line ``first + j // COLS`` (``BY_ROW``) or ``first + j %
    COLS``; ``(ROWS * COLS, LINES)`` with ``TRANSPOSE``."""
    if TRANSPOSE:
        j = tl.arange(0, ROWS * COLS)[:, None]
        i = tl.arange(0, LINES)[None, :]
    else:
        i = tl.arange(0, LINES)[:, None]
        j = tl.arange(0, ROWS * COLS)[None, :]
    if BY_ROW:
        return tl.where(first + j // COLS == i, 1.0, 0.0)
    else:
        return tl.where(first + j % COLS == i, 1.0, 0.0)


@triton.jit
def _shifted(terms, first, q_first, q_ok, r, extent, dilation, lines, TAPS,
             LINES: tl.constexpr, HAS_REL: tl.constexpr, BLOCK_T: tl.constexpr):
    """``(queries, LINES)``: each query's q.r term (from its per-tap terms
    ``terms (queries, BLOCK_T)``) for the sub-lattice rows (columns)
    ``first + i``, i < ``lines``; -1e30 where that line is outside the
    query's window, outside the image (residue ``r``, ``extent`` pixels,
    ``dilation``), or the query is not in the image (``q_ok``)."""
    i = tl.arange(0, LINES)
    line = first + i
    line_ok = (i < lines) & (line >= 0) & (r + line * dilation < extent)
    tap = line[None, :] - q_first[:, None] + (TAPS - 1) // 2
    ok = (tap >= 0) & (tap < TAPS) & line_ok[None, :] & q_ok[:, None]
    if HAS_REL:
        value = tl.gather(terms, tl.minimum(tl.maximum(tap, 0), BLOCK_T - 1), 1)
    else:
        value = tl.zeros(tap.shape, tl.float32)
    return tl.where(ok, value, -1e30)


@triton.jit
def _logits(q, kT, rows, cols, row0, col0, ROWS: tl.constexpr, COLS: tl.constexpr,
            HAS_KEY: tl.constexpr, PRODUCTS: tl.constexpr, ACCUMULATE: tl.constexpr = True):
    """Logits ``(queries, ROWS * COLS keys)`` of a key block
    whose rows (columns) are lines ``row0..`` (``col0..``) of ``rows``
    (``cols``), the queries' q.r terms and mask per line
    (:func:`_shifted`): ``q.k`` is one product, the q.r terms and the mask
    two more with one-hot matrices (float32 accuracy). A masked key gets a
    logit below -1e30: its weight is exactly 0 (``exp2`` of it, scaled,
    minus any finite maximum underflows). ``ACCUMULATE``: the one-hot
    products add into one accumulator (see :func:`_dot`); the backward's
    query and tables kernels (:func:`_halo_block_gradients`) sum them with
    ``+`` (accumulated, the query kernel spilled registers on sm_80 at head
    widths 8 and 16, and in tf32 at 128)."""
    LINES: tl.constexpr = rows.shape[1]
    s = _dot_one_hot(rows, _one_hot(row0, LINES, ROWS, COLS, True, False), PRODUCTS)
    if ACCUMULATE:
        s = _dot_one_hot(cols, _one_hot(col0, LINES, ROWS, COLS, False, False), PRODUCTS, s)
    else:
        s += _dot_one_hot(cols, _one_hot(col0, LINES, ROWS, COLS, False, False), PRODUCTS)
    if HAS_KEY:
        s += _dot(q, kT, PRODUCTS)
    return s


@triton.jit
def _per_tap(lines, q_first, first, TAPS, BLOCK_T: tl.constexpr):
    """``(queries, BLOCK_T)``: ``lines (queries, L)``, sums over the halo's
    lines ``first + i``, shifted to each query's taps (``q_first``: the
    query's line)."""
    t = tl.arange(0, BLOCK_T)[None, :]
    line = t + q_first[:, None] - (TAPS - 1) // 2 - first
    inside = (line >= 0) & (line < lines.shape[1]) & (t < TAPS)
    return tl.where(inside, tl.gather(lines, tl.minimum(tl.maximum(line, 0),
                                                        lines.shape[1] - 1), 1), 0.0)


@triton.jit
def _halo_terms(q, RR, RC, n, N, D, DR, qy, qx, q_ok, top, left, ry, rx, H, W, DH, DW, KH, KW,
                TILE_H: tl.constexpr, TILE_W: tl.constexpr, HAS_REL: tl.constexpr,
                PRODUCTS: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALO: tl.constexpr):
    """The tile's q.r terms and mask on the rows and columns of its halo
    (from ``top``, ``left``): ``(queries, BLOCK_HALO)`` each."""
    a_row = tl.zeros([TILE_H * TILE_W, BLOCK_T], tl.float32)
    b_col = tl.zeros([TILE_H * TILE_W, BLOCK_T], tl.float32)
    if HAS_REL:
        row_table, col_table = _tables(RR, RC, n, N, D, DR, KH, KW, BLOCK_D, BLOCK_T)
        a_row, b_col = _relative_terms(q, row_table, col_table, PRODUCTS)
    rows = _shifted(a_row, top, qy, q_ok, ry, H, DH, TILE_H + KH - 1, KH, BLOCK_HALO, HAS_REL,
                    BLOCK_T)
    cols = _shifted(b_col, left, qx, q_ok, rx, W, DW, TILE_W + KW - 1, KW, BLOCK_HALO, HAS_REL,
                    BLOCK_T)
    return rows, cols


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


@triton.jit
def _halo_block_keys(q, K, block, ry, rx, top, left, H, W, DH, DW, KW, d, D, skc, skh, skw,
                     HAS_KEY: tl.constexpr, EVEN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     TILE_W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Halo block ``block`` of a tile (the halo from ``top``, ``left``):
    its offset ``(hy, hx)``, its keys' clamped rows and columns and whether
    they are in the image, and ``K^T`` (zeros without ``HAS_KEY``)."""
    hy, hx = _halo_block(block, KW, TILE_W, BLOCK_H, BLOCK_W)
    ky, kx, key_y, key_x, k_ok = _pixels(ry, rx, top + hy, left + hx, H, W, DH, DW,
                                         BLOCK_H, BLOCK_W)
    kT = tl.zeros([BLOCK_D, BLOCK_H * BLOCK_W], q.dtype)
    if HAS_KEY:
        kT = _load(K, key_y, key_x, k_ok, d, D, skc, skh, skw, True, False, EVEN, CHANNELS_LAST)
    return hy, hx, key_y, key_x, k_ok, kT


# ---------------------------------------------------------------------------
# Forward.


@_jit
def _forward_kernel(Q, K, V, RR, RC, OUT, LSE,
                    sqb, sqn, sqc, sqh, sqw, skb, skn, skc, skh, skw,
                    svb, svn, svc, svh, svw,
                    sob, son, soc, soh, sow,
                    H, W, N, D, DV, DR, KH, KW, DH, DW,
                    HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr, PRODUCTS: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, EVEN: tl.constexpr,
                    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_HALO: tl.constexpr):
    """Output and log-sum-exp (log2 units) of one tile of queries."""
    sqb, sqn, sqc, sqh, sqw = _layout(sqb, sqn, sqc, sqh, sqw, CHANNELS_LAST)
    skb, skn, skc, skh, skw = _layout(skb, skn, skc, skh, skw, CHANNELS_LAST)
    svb, svn, svc, svh, svw = _layout(svb, svn, svc, svh, svw, CHANNELS_LAST)
    sob, son, soc, soh, sow = _layout(sob, son, soc, soh, sow, CHANNELS_LAST)
    bn = tl.program_id(1).to(tl.int64)
    b = bn // N
    n = bn % N
    ry, rx, sy0, sx0, _ = _lattice_tile(tl.program_id(0), H, W, DH, DW, TILE_H, TILE_W)
    qy, qx, y, x, q_ok = _pixels(ry, rx, sy0, sx0, H, W, DH, DW, TILE_H, TILE_W)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load(Q + b * sqb + n * sqn, y, x, q_ok, d, D, sqc, sqh, sqw, False, True, EVEN,
              CHANNELS_LAST)
    K += b * skb + n * skn
    V += b * svb + n * svn
    # A finite start: masked keys (below -1e30) get weight 0 beside any real
    # key; a query with none (outside the image) is not stored.
    m = tl.full([TILE_H * TILE_W], -1e30, tl.float32)
    denom = tl.zeros([TILE_H * TILE_W], tl.float32)
    acc = tl.zeros([TILE_H * TILE_W, BLOCK_DV], tl.float32)
    top = sy0 - (KH - 1) // 2
    left = sx0 - (KW - 1) // 2
    rows, cols = _halo_terms(q, RR, RC, n, N, D, DR, qy, qx, q_ok, top, left, ry, rx, H, W,
                             DH, DW, KH, KW, TILE_H, TILE_W, HAS_REL, PRODUCTS, BLOCK_D, BLOCK_T,
                             BLOCK_HALO)
    for block in range(_halo_blocks(KH, KW, TILE_H, TILE_W, BLOCK_H, BLOCK_W)):
        hy, hx, key_y, key_x, k_ok, kT = _halo_block_keys(
            q, K, block, ry, rx, top, left, H, W, DH, DW, KW, d, D, skc, skh, skw, HAS_KEY,
            EVEN, CHANNELS_LAST, TILE_W, BLOCK_H, BLOCK_W, BLOCK_D)
        s = _logits(q, kT, rows, cols, hy, hx, BLOCK_H, BLOCK_W, HAS_KEY, PRODUCTS)
        v = _load(V, key_y, key_x, k_ok, dv, DV, svc, svh, svw, False, False, EVEN, CHANNELS_LAST)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        scale = tl.exp2((m - m_new) * LOG2E)
        p = tl.exp2(s * LOG2E - (m_new * LOG2E)[:, None])  # one FFMA a logit
        denom = denom * scale + tl.sum(p, axis=1)
        acc = acc * scale[:, None] + _dot(p.to(v.dtype), v, PRODUCTS)
        m = m_new
    denom = tl.where(denom > 0, denom, 1.0)  # only pixels outside the image have 0
    _store(OUT + b * sob + n * son, acc / denom[:, None], y, x, q_ok, dv, DV, soc, soh, sow, EVEN,
           CHANNELS_LAST)
    tl.store(LSE + (bn * H + y) * W + x, m * LOG2E + tl.log2(denom), mask=q_ok)


# ---------------------------------------------------------------------------
# Backward.


@triton.jit
def _halo_block_gradients(q, dout, lse, rows, cols, K, V, block, ry, rx, top, left, H, W, DH,
                          DW, KW, d, D, dv, DV, skc, skh, skw, svc, svh, svw,
                          HAS_KEY: tl.constexpr, PRODUCTS: tl.constexpr, EVEN: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, TILE_W: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """``(K^T, P, dP)`` of a tile's queries and its halo block ``block``
    (the halo from ``top``, ``left``)."""
    hy, hx, key_y, key_x, k_ok, kT = _halo_block_keys(
        q, K, block, ry, rx, top, left, H, W, DH, DW, KW, d, D, skc, skh, skw, HAS_KEY, EVEN,
        CHANNELS_LAST, TILE_W, BLOCK_H, BLOCK_W, BLOCK_D)
    vT = _load(V, key_y, key_x, k_ok, dv, DV, svc, svh, svw, True, False, EVEN, CHANNELS_LAST)
    s = _logits(q, kT, rows, cols, hy, hx, BLOCK_H, BLOCK_W, HAS_KEY, PRODUCTS, False)
    return kT, tl.exp2(s * LOG2E - lse[:, None]), _dot(dout, vT, PRODUCTS)


@triton.jit
def _delta_from_output(OUT, y, x, q_ok, dout, dv, DV, sfc, sfh, sfw, EVEN: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr):
    """``delta_i = dout_i . out_i`` of a tile's queries (FlashAttention-2's)."""
    out = _load(OUT, y, x, q_ok, dv, DV, sfc, sfh, sfw, False, True, EVEN, CHANNELS_LAST)
    return tl.sum(dout.to(tl.float32) * out.to(tl.float32), axis=1)


@_jit
def _backward_query_kernel(Q, K, V, RR, RC, DOUT, OUT, LSE, DELTA, DQ,
                           sqb, sqn, sqc, sqh, sqw, skb, skn, skc, skh, skw,
                           svb, svn, svc, svh, svw,
                           sgb, sgn, sgc, sgh, sgw, sob, son, soc, soh, sow,
                           sfb, sfn, sfc, sfh, sfw,
                           H, W, N, D, DV, DR, KH, KW, DH, DW,
                           HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr, HAS_OUT: tl.constexpr,
                           PRODUCTS: tl.constexpr,
                           CHANNELS_LAST: tl.constexpr, EVEN: tl.constexpr,
                           TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_HALO: tl.constexpr):
    """delta (stored) and the q.k share of dq of one tile of queries:
    ``delta_i = dout_i . out_i`` from the forward's output (``HAS_OUT``,
    strides ``sf*``) or, without it, from a walk over the halo as ``sum_j
    P_ij dP_ij``; then a walk for ``dq = dS @ K`` with ``dS = P (dP -
    delta)``."""
    sqb, sqn, sqc, sqh, sqw = _layout(sqb, sqn, sqc, sqh, sqw, CHANNELS_LAST)
    skb, skn, skc, skh, skw = _layout(skb, skn, skc, skh, skw, CHANNELS_LAST)
    svb, svn, svc, svh, svw = _layout(svb, svn, svc, svh, svw, CHANNELS_LAST)
    sgb, sgn, sgc, sgh, sgw = _layout(sgb, sgn, sgc, sgh, sgw, CHANNELS_LAST)
    sob, son, soc, soh, sow = _layout(sob, son, soc, soh, sow, CHANNELS_LAST)
    bn = tl.program_id(1).to(tl.int64)
    b = bn // N
    n = bn % N
    ry, rx, sy0, sx0, _ = _lattice_tile(tl.program_id(0), H, W, DH, DW, TILE_H, TILE_W)
    qy, qx, y, x, q_ok = _pixels(ry, rx, sy0, sx0, H, W, DH, DW, TILE_H, TILE_W)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load(Q + b * sqb + n * sqn, y, x, q_ok, d, D, sqc, sqh, sqw, False, True, EVEN,
              CHANNELS_LAST)
    dout = _load(DOUT + b * sgb + n * sgn, y, x, q_ok, dv, DV, sgc, sgh, sgw, False, True, EVEN,
                 CHANNELS_LAST)
    lse = tl.load(LSE + (bn * H + y) * W + x, mask=q_ok, other=0.0)
    K += b * skb + n * skn
    V += b * svb + n * svn
    top = sy0 - (KH - 1) // 2
    left = sx0 - (KW - 1) // 2
    rows, cols = _halo_terms(q, RR, RC, n, N, D, DR, qy, qx, q_ok, top, left, ry, rx, H, W,
                             DH, DW, KH, KW, TILE_H, TILE_W, HAS_REL, PRODUCTS, BLOCK_D,
                             BLOCK_T, BLOCK_HALO)
    if HAS_OUT:
        sfb, sfn, sfc, sfh, sfw = _layout(sfb, sfn, sfc, sfh, sfw, CHANNELS_LAST)
        delta = _delta_from_output(OUT + b * sfb + n * sfn, y, x, q_ok, dout, dv, DV, sfc, sfh,
                                   sfw, EVEN, CHANNELS_LAST)
    else:
        delta = tl.zeros([TILE_H * TILE_W], tl.float32)
        for block in range(_halo_blocks(KH, KW, TILE_H, TILE_W, BLOCK_H, BLOCK_W)):
            kT, p, dp = _halo_block_gradients(
                q, dout, lse, rows, cols, K, V, block, ry, rx, top, left, H, W, DH, DW, KW, d,
                D, dv, DV, skc, skh, skw, svc, svh, svw, HAS_KEY, PRODUCTS, EVEN, CHANNELS_LAST,
                TILE_W, BLOCK_H, BLOCK_W, BLOCK_D)
            delta += tl.sum(p * dp, axis=1)
    tl.store(DELTA + (bn * H + y) * W + x, delta, mask=q_ok)
    dq = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    if HAS_KEY:
        for block in range(_halo_blocks(KH, KW, TILE_H, TILE_W, BLOCK_H, BLOCK_W)):
            kT, p, dp = _halo_block_gradients(
                q, dout, lse, rows, cols, K, V, block, ry, rx, top, left, H, W, DH, DW, KW, d,
                D, dv, DV, skc, skh, skw, svc, svh, svw, HAS_KEY, PRODUCTS, EVEN, CHANNELS_LAST,
                TILE_W, BLOCK_H, BLOCK_W, BLOCK_D)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(kT.dtype), tl.trans(kT), PRODUCTS)
    _store(DQ + b * sob + n * son, dq, y, x, q_ok, d, D, soc, soh, sow, EVEN, CHANNELS_LAST)


@_jit
def _backward_tables_kernel(Q, K, V, RR, RC, DOUT, OUT, LSE, DELTA, DQ, DREL,
                            sqb, sqn, sqc, sqh, sqw, skb, skn, skc, skh, skw,
                            svb, svn, svc, svh, svw,
                            sgb, sgn, sgc, sgh, sgw, sob, son, soc, soh, sow,
                            sfb, sfn, sfc, sfh, sfw,
                            H, W, N, D, DV, DR, KH, KW, DH, DW, tile_rows,
                            HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr, OWNS_DQ: tl.constexpr,
                            PRODUCTS: tl.constexpr,
                            CHANNELS_LAST: tl.constexpr, EVEN: tl.constexpr,
                            TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_HALO: tl.constexpr):
    """The relative tables' gradient and their share of dq, of
    ``tile_rows`` tiles of queries one above the other: dS summed per halo
    row and column, shifted to each query's taps (``dA``, ``dB``), then
    ``dq += dA @ RowT^T + dB @ ColT^T`` and ``DREL[program] += Q^T @ [dA |
    dB]`` as ``(BLOCK_D, 2 * BLOCK_T)``. ``OWNS_DQ``: the kernel does all
    the query kernel would, from the forward's output (strides ``sf*``):
    ``delta = dout . out`` (stored) and ``dq = dS @ K`` plus the tables'
    share, stored once; otherwise it reads the query kernel's delta and
    adds its share to the query kernel's DQ."""
    sqb, sqn, sqc, sqh, sqw = _layout(sqb, sqn, sqc, sqh, sqw, CHANNELS_LAST)
    skb, skn, skc, skh, skw = _layout(skb, skn, skc, skh, skw, CHANNELS_LAST)
    svb, svn, svc, svh, svw = _layout(svb, svn, svc, svh, svw, CHANNELS_LAST)
    sgb, sgn, sgc, sgh, sgw = _layout(sgb, sgn, sgc, sgh, sgw, CHANNELS_LAST)
    sob, son, soc, soh, sow = _layout(sob, son, soc, soh, sow, CHANNELS_LAST)
    sfb, sfn, sfc, sfh, sfw = _layout(sfb, sfn, sfc, sfh, sfw, CHANNELS_LAST)
    BLOCK_DQ: tl.constexpr = 16
    # dS's sums per halo row and column: in half precision one tf32 product
    # (dS to 2^-11; dq and dk take it rounded to the input dtype), in
    # float32 two.
    sums_products: tl.constexpr = 2 if (PRODUCTS == 0 and Q.dtype.element_ty != tl.float32) \
        else PRODUCTS
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
    # This program's partial sums of the tables' gradient, kept in memory
    # between tiles (not in registers): (BLOCK_D, 2 * BLOCK_T).
    t = tl.arange(0, BLOCK_T)[None, :]
    sums = DREL + (bn * tl.num_programs(0) + pid) * BLOCK_D * 2 * BLOCK_T
    tl.store(sums + d[:, None] * 2 * BLOCK_T + t, tl.zeros([BLOCK_D, BLOCK_T], tl.float32))
    tl.store(sums + d[:, None] * 2 * BLOCK_T + BLOCK_T + t,
             tl.zeros([BLOCK_D, BLOCK_T], tl.float32))
    partial = sums + tl.arange(0, BLOCK_DQ)[:, None] * 2 * BLOCK_T + t
    for r in range(0, tl.minimum(tile_rows, tiles_h - chunk * tile_rows)):
        ry, rx, sy0, sx0, _ = _lattice_tile(first_tile + r * tiles_w, H, W, DH, DW,
                                            TILE_H, TILE_W)
        qy, qx, y, x, q_ok = _pixels(ry, rx, sy0, sx0, H, W, DH, DW, TILE_H, TILE_W)
        q = _load(Q + b * sqb + n * sqn, y, x, q_ok, d, D, sqc, sqh, sqw, False, True, EVEN,
                  CHANNELS_LAST)
        dout = _load(DOUT + b * sgb + n * sgn, y, x, q_ok, dv, DV, sgc, sgh, sgw, False, True,
                     EVEN, CHANNELS_LAST)
        pixel = (bn * H + y) * W + x
        lse = tl.load(LSE + pixel, mask=q_ok, other=0.0)
        if OWNS_DQ:
            delta = _delta_from_output(OUT + b * sfb + n * sfn, y, x, q_ok, dout, dv, DV, sfc,
                                       sfh, sfw, EVEN, CHANNELS_LAST)
            tl.store(DELTA + pixel, delta, mask=q_ok)
        else:
            delta = tl.load(DELTA + pixel, mask=q_ok, other=0.0)
        top = sy0 - (KH - 1) // 2
        left = sx0 - (KW - 1) // 2
        rows, cols = _halo_terms(q, RR, RC, n, N, D, DR, qy, qx, q_ok, top, left, ry, rx, H,
                                 W, DH, DW, KH, KW, TILE_H, TILE_W, HAS_REL, PRODUCTS, BLOCK_D,
                                 BLOCK_T, BLOCK_HALO)
        grad_rows = tl.zeros([TILE_H * TILE_W, BLOCK_HALO], tl.float32)
        grad_cols = tl.zeros([TILE_H * TILE_W, BLOCK_HALO], tl.float32)
        dq = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
        for block in range(_halo_blocks(KH, KW, TILE_H, TILE_W, BLOCK_H, BLOCK_W)):
            kT, p, dp = _halo_block_gradients(
                q, dout, lse, rows, cols, K, V, block, ry, rx, top, left, H, W, DH, DW, KW, d,
                D, dv, DV, skc, skh, skw, svc, svh, svw, HAS_KEY, PRODUCTS, EVEN, CHANNELS_LAST,
                TILE_W, BLOCK_H, BLOCK_W, BLOCK_D)
            hy, hx = _halo_block(block, KW, TILE_W, BLOCK_H, BLOCK_W)
            ds = p * (dp - delta[:, None])
            if OWNS_DQ and HAS_KEY:
                dq = _dot(ds.to(kT.dtype), tl.trans(kT), PRODUCTS, dq)
            grad_rows = _dot_one_hot(
                ds, _one_hot(hy, BLOCK_HALO, BLOCK_H, BLOCK_W, True, True), sums_products,
                grad_rows)
            grad_cols = _dot_one_hot(
                ds, _one_hot(hx, BLOCK_HALO, BLOCK_H, BLOCK_W, False, True), sums_products,
                grad_cols)
        grad_a = _per_tap(grad_rows, qy, top, KH, BLOCK_T)
        grad_b = _per_tap(grad_cols, qx, left, KW, BLOCK_T)
        if OWNS_DQ:
            row_table, col_table = _tables(RR, RC, n, N, D, DR, KH, KW, BLOCK_D, BLOCK_T, True)
            if DQ.dtype.element_ty == tl.float32:
                dq = _dot_f32(grad_a, row_table, PRODUCTS, dq)
                dq = _dot_f32(grad_b, col_table, PRODUCTS, dq)
            else:
                dq = _dot_f32_by_bf16(grad_a, row_table, PRODUCTS, dq)
                dq = _dot_f32_by_bf16(grad_b, col_table, PRODUCTS, dq)
            _store(DQ + b * sob + n * son, dq, y, x, q_ok, d, D, soc, soh, sow, EVEN,
                   CHANNELS_LAST)
        # The partial sums (and without OWNS_DQ dq) a slice of channels at a
        # time (q's slice reloaded, from cache): whole, they would spill at
        # D >= 64.
        for d0 in range(0, BLOCK_D, BLOCK_DQ):
            dc = d0 + tl.arange(0, BLOCK_DQ)
            if not OWNS_DQ:
                dq_ptr = DQ + b * sob + n * son + _offsets(y, x, dc, soc, soh, sow, False)
                dq_ok = _tile_mask(q_ok, dc, D, EVEN, CHANNELS_LAST, False)
                row_table, col_table = _tables(RR, RC, n, N, D, DR, KH, KW, BLOCK_DQ, BLOCK_T,
                                               True, d0)
                dq_slice = tl.load(dq_ptr, mask=dq_ok, other=0.0).to(tl.float32)
                if DQ.dtype.element_ty == tl.float32:
                    dq_slice = _dot_f32(grad_a, row_table, PRODUCTS, dq_slice)
                    dq_slice = _dot_f32(grad_b, col_table, PRODUCTS, dq_slice)
                else:  # rounded to q's dtype when stored
                    dq_slice = _dot_f32_by_bf16(grad_a, row_table, PRODUCTS, dq_slice)
                    dq_slice = _dot_f32_by_bf16(grad_b, col_table, PRODUCTS, dq_slice)
                tl.store(dq_ptr, dq_slice.to(DQ.dtype.element_ty), mask=dq_ok)
            q_slice = _load(Q + b * sqb + n * sqn, y, x, q_ok, dc, D, sqc, sqh, sqw, True, True,
                            EVEN, CHANNELS_LAST)
            slice_sums = partial + d0 * 2 * BLOCK_T
            tl.store(slice_sums, _dot_exact_by_f32(q_slice, grad_a, PRODUCTS,
                                                   tl.load(slice_sums)))
            tl.store(slice_sums + BLOCK_T, _dot_exact_by_f32(q_slice, grad_b, PRODUCTS,
                                                             tl.load(slice_sums + BLOCK_T)))


@_jit
def _backward_key_kernel(Q, K, V, RR, RC, DOUT, LSE, DELTA, DK, DV_,
                         sqb, sqn, sqc, sqh, sqw, skb, skn, skc, skh, skw,
                         svb, svn, svc, svh, svw,
                         sgb, sgn, sgc, sgh, sgw, sob, son, soc, soh, sow, swb, swn, swc, swh, sww,
                         H, W, N, D, DV, DR, KH, KW, DH, DW,
                         HAS_KEY: tl.constexpr, HAS_REL: tl.constexpr, PRODUCTS: tl.constexpr,
                         CHANNELS_LAST: tl.constexpr, EVEN: tl.constexpr,
                         TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_HALO: tl.constexpr):
    """dk and dv of one tile of keys, from the queries whose windows cover
    them: ``dV = P^T @ dO``, ``dK = dS^T @ Q`` (strides ``so*`` of dK,
    ``sw*`` of dV)."""
    sqb, sqn, sqc, sqh, sqw = _layout(sqb, sqn, sqc, sqh, sqw, CHANNELS_LAST)
    skb, skn, skc, skh, skw = _layout(skb, skn, skc, skh, skw, CHANNELS_LAST)
    svb, svn, svc, svh, svw = _layout(svb, svn, svc, svh, svw, CHANNELS_LAST)
    sgb, sgn, sgc, sgh, sgw = _layout(sgb, sgn, sgc, sgh, sgw, CHANNELS_LAST)
    sob, son, soc, soh, sow = _layout(sob, son, soc, soh, sow, CHANNELS_LAST)
    swb, swn, swc, swh, sww = _layout(swb, swn, swc, swh, sww, CHANNELS_LAST)
    bn = tl.program_id(1).to(tl.int64)
    b = bn // N
    n = bn % N
    ry, rx, sy0, sx0, _ = _lattice_tile(tl.program_id(0), H, W, DH, DW, TILE_H, TILE_W)
    ky, kx, key_y, key_x, k_ok = _pixels(ry, rx, sy0, sx0, H, W, DH, DW, TILE_H, TILE_W)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kT = tl.zeros([BLOCK_D, TILE_H * TILE_W], DOUT.dtype.element_ty)
    if HAS_KEY:
        kT = _load(K + b * skb + n * skn, key_y, key_x, k_ok, d, D, skc, skh, skw, True, True,
                   EVEN, CHANNELS_LAST)
    vT = _load(V + b * svb + n * svn, key_y, key_x, k_ok, dv, DV, svc, svh, svw, True, True, EVEN,
               CHANNELS_LAST)
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
        q = _load(Q, y, x, q_ok, d, D, sqc, sqh, sqw, False, False, EVEN, CHANNELS_LAST)
        dout = _load(DOUT, y, x, q_ok, dv, DV, sgc, sgh, sgw, False, False, EVEN, CHANNELS_LAST)
        pixel = (bn * H + y) * W + x
        lse = tl.load(LSE + pixel)
        a_row = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_T], tl.float32)
        b_col = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_T], tl.float32)
        if HAS_REL:
            a_row, b_col = _relative_terms(q, row_table, col_table, PRODUCTS)
        # The queries' terms on the key tile's rows and columns.
        rows = _shifted(a_row, sy0, qy, q_ok, ry, H, DH, TILE_H, KH, 16, HAS_REL, BLOCK_T)
        cols = _shifted(b_col, sx0, qx, q_ok, rx, W, DW, TILE_W, KW, 16, HAS_REL, BLOCK_T)
        s = _logits(q, kT, rows, cols, 0, 0, TILE_H, TILE_W, HAS_KEY, PRODUCTS)
        p = tl.exp2(s * LOG2E - lse[:, None])  # (queries, keys)
        dval += _dot(tl.trans(p.to(dout.dtype)), dout, PRODUCTS)
        if HAS_KEY:
            delta = tl.load(DELTA + pixel)
            ds = p * (_dot(dout, vT, PRODUCTS) - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRODUCTS)
    _store(DV_ + b * swb + n * swn, dval, key_y, key_x, k_ok, dv, DV, swc, swh, sww, EVEN,
           CHANNELS_LAST)
    if HAS_KEY:
        _store(DK + b * sob + n * son, dk, key_y, key_x, k_ok, d, D, soc, soh, sow, EVEN,
               CHANNELS_LAST)


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


def channels_last(*maps) -> bool:
    """Whether the kernels address these ``(B, N, D, H, W)`` maps (None
    skipped) channels-last, with vector loads: each with channel stride 1
    and its other strides and width D multiples of ``VECTOR`` elements (as
    the views of a channels-last projection are); otherwise planar, with a
    unit column stride. Reads only shapes and strides (also of fake
    tensors)."""
    maps = [t for t in maps if t is not None]
    return all(t.stride(2) == 1 and t.shape[2] % VECTOR == 0
               and all(stride % VECTOR == 0 for dim, (size, stride)
                       in enumerate(zip(t.shape, t.stride())) if dim != 2 and size > 1)
               for t in maps)


def empty_map(shape, like, channels_last_layout: bool):
    """An empty ``(B, N, D, H, W)`` map of ``like``'s dtype and device, in
    the kernels' channels-last layout (``(B, H, W, N, D)`` in memory) or
    contiguous."""
    if not channels_last_layout:
        return like.new_empty(shape)
    batch, heads, dim, height, width = shape
    return like.new_empty((batch, height, width, heads, dim)).permute(0, 3, 4, 1, 2)


def _in_layout(t, channels_last_layout: bool):
    """``t`` addressable in the given layout, copied only if it is not."""
    if t is None:
        return None
    if channels_last_layout:
        return t if channels_last(t) else empty_map(t.shape, t, True).copy_(t)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t, channels_last_layout: bool) -> tuple:
    """Batch, head, channel, row and column strides, as the kernels take
    them: in units of ``VECTOR`` elements for channels-last maps (and 0
    where the size is 1), see ``_layout``."""
    if not channels_last_layout:
        return tuple(t.stride())
    return tuple(0 if size == 1 else stride // VECTOR
                 for size, stride in zip(t.shape, t.stride()))


def _grid_tiles(height, width, dilation) -> int:
    dh, dw = dilation
    sub_h, sub_w = triton.cdiv(height, dh), triton.cdiv(width, dw)
    return dh * dw * triton.cdiv(sub_h, TILE_H) * triton.cdiv(sub_w, TILE_W)


def products_mode(dtype: torch.dtype) -> int:
    """The kernels' ``PRODUCTS``: 2 (one tf32 product per float32 product)
    for float32 inputs when ``torch.get_float32_matmul_precision()`` allows
    tf32 (``'high'`` or ``'medium'``); otherwise 1 under the interpreter and
    0 on GPUs (float32 accuracy)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != 'highest':
        return 2
    return 1 if INTERPRETED else 0


def _launch_args(query, key, value, rel_row, rel_col, window, dilation, layout) -> tuple:
    """Tensors, strides and geometry shared by the launches, and each
    kernel's constexprs and options (by name); ``layout``: channels-last
    (True) or planar."""
    _, heads, dim, _, _ = query.shape
    has_key, has_rel = key is not None, rel_row is not None
    tables = (rel_row.contiguous(), rel_col.contiguous()) if has_rel else (query, query)
    tensors = (query, key if has_key else query, value, *tables)  # placeholders never read
    strides = tuple(s for t in tensors[:3] for s in _strides(t, layout))
    dim_row = rel_row.shape[-1] if has_rel else 0
    geometry = (*query.shape[3:], heads, dim, value.shape[2], dim_row, *window, *dilation)
    blocks = block_config(dim, value.shape[2], window, query.element_size())
    shared = dict(HAS_KEY=has_key, HAS_REL=has_rel, PRODUCTS=products_mode(query.dtype),
                  CHANNELS_LAST=layout,
                  EVEN=dim == blocks['BLOCK_D'] and value.shape[2] == blocks['BLOCK_DV'])
    flags = {}
    for kernel in KERNELS:
        kernel_blocks, options = kernel_config(kernel, blocks, query.element_size(), layout)
        flags[kernel] = dict(shared, **kernel_blocks, **options)
    return tensors, strides, geometry, flags


def forward(query, key, value, rel_row, rel_col, window, dilation, keep_attention):
    """Returns ``(out, lse)``: out in v's dtype, channels-last (as
    :func:`empty_map` makes it) when :func:`channels_last` holds for q, k, v,
    otherwise contiguous; lse ``(B, N, H, W)`` float32 (log2 units).
    ``keep_attention`` is ignored: the map is never stored."""
    _check_head_widths(query, value)
    batch, heads, _, height, width = query.shape
    layout = channels_last(query, key, value)
    query, key, value = (_in_layout(t, layout) for t in (query, key, value))
    out = empty_map(value.shape, value, layout)
    lse = torch.empty((batch, heads, height, width), dtype=torch.float32, device=query.device)
    tensors, strides, geometry, flags = _launch_args(query, key, value, rel_row, rel_col,
                                                     window, dilation, layout)
    with _on_device(query):
        _forward_kernel[(_grid_tiles(height, width, dilation), batch * heads)](
            *tensors, out, lse, *strides, *_strides(out, layout), *geometry,
            **flags['_forward_kernel'])
    return out, lse


def backward(grad_out, out, lse, query, key, value, rel_row, rel_col, window, dilation,
             grad_query, grad_key, grad_value):
    """Writes dq, dk, dv into the given buffers; returns the tables'
    gradients in float32 (None without tables). ``out``, the forward's
    output as it returned it, gives ``delta = dout . out``; None when it
    is not at hand (modified in place since), and the query kernel
    recomputes delta from ``lse`` with a walk over the halo."""
    _check_head_widths(query, value)
    batch, heads, dim, height, width = query.shape
    layout = channels_last(query, key, value)
    query, key, value, grad_out = (_in_layout(t, layout) for t in (query, key, value, grad_out))
    has_out = out is not None
    out = _in_layout(out, layout) if has_out else grad_out  # a placeholder never read
    tensors, strides, geometry, flags = _launch_args(query, key, value, rel_row, rel_col,
                                                     window, dilation, layout)
    has_rel = rel_row is not None
    # The kernels write the given buffers when they are in the kernels'
    # layout (as the layer's packed ones are), others a copy.
    buffers = (grad_query, grad_key, grad_value)
    grad_q, grad_k, grad_v = (_in_layout(t, layout) for t in buffers)
    delta = torch.empty((batch, heads, height, width), dtype=torch.float32,
                        device=query.device)
    dh, dw = dilation
    tiles_h = triton.cdiv(triton.cdiv(height, dh), TILE_H)
    tiles_w = triton.cdiv(triton.cdiv(width, dw), TILE_W)
    tables = flags['_backward_tables_kernel']
    block_d, block_t = tables['BLOCK_D'], tables['BLOCK_T']
    # The tables' gradient: several tiles per program, few partial sums.
    programs = max(1, TABLE_PARTIAL_BYTES // (batch * heads * block_d * 2 * block_t * 4))
    tile_rows = triton.cdiv(tiles_h * tiles_w * dh * dw, programs)
    tables_grid = (dh * dw * tiles_w * triton.cdiv(tiles_h, tile_rows), batch * heads)
    partial = torch.empty((batch * heads * tables_grid[0], block_d, 2 * block_t) if has_rel
                          else (1,), dtype=torch.float32, device=query.device)
    tile_grid = (_grid_tiles(height, width, dilation), batch * heads)
    owns_dq = has_rel and has_out and tables_kernel_owns_dq(
        query.element_size(), max(block_d, tables['BLOCK_DV']), layout)
    with _on_device(query):
        if not owns_dq:
            _backward_query_kernel[tile_grid](
                *tensors, grad_out, out, lse, delta, grad_q, *strides,
                *_strides(grad_out, layout), *_strides(grad_q, layout), *_strides(out, layout),
                *geometry, HAS_OUT=has_out, **flags['_backward_query_kernel'])
        if has_rel:  # otherwise after the query kernel: reads its delta, adds to its dq
            _backward_tables_kernel[tables_grid](
                *tensors, grad_out, out, lse, delta, grad_q, partial, *strides,
                *_strides(grad_out, layout), *_strides(grad_q, layout), *_strides(out, layout),
                *geometry, tile_rows, OWNS_DQ=owns_dq, **flags['_backward_tables_kernel'])
        grad_k = grad_q if grad_k is None else grad_k  # never written without HAS_KEY
        _backward_key_kernel[tile_grid](
            *tensors, grad_out, lse, delta, grad_k, grad_v, *strides, *_strides(grad_out, layout),
            *_strides(grad_k, layout), *_strides(grad_v, layout), *geometry,
            **flags['_backward_key_kernel'])
    for buffer, written in zip(buffers, (grad_q, grad_k, grad_v)):
        if buffer is not None and written is not buffer:
            buffer.copy_(written)
    if not has_rel:
        return None, None
    kh, kw = window
    dim_row = rel_row.shape[-1]
    # (B * N * programs, BLOCK_D, 2 * BLOCK_T) -> (N, BLOCK_D, 2, BLOCK_T), in a fixed order
    sums = partial.view(batch, heads, tables_grid[0], block_d, 2, block_t).sum(dim=(0, 2))
    grad_rel_row = sums[:, :dim_row, 0, :kh].permute(2, 0, 1)  # (kh, N, Dr)
    grad_rel_col = sums[:, dim_row:dim, 1, :kw].permute(2, 0, 1)  # (kw, N, Dc)
    return grad_rel_row.contiguous(), grad_rel_col.contiguous()




# ---------------------------------------------------------------------------
# For compile checks without a GPU (tools/analysis): what a launch compiles.

KERNELS = ('_forward_kernel', '_backward_query_kernel', '_backward_tables_kernel',
           '_backward_key_kernel')
_FLOAT32_POINTERS = ('RR', 'RC', 'LSE', 'DELTA', 'DREL')
_TRITON_DTYPES = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}


def compile_source_args(kernel: str, dtype: torch.dtype, head_dim: int, value_dim: int = None,
                        window=(7, 7), has_key: bool = True, has_rel: bool = True,
                        tf32: bool = False, channels_last_layout: bool = False,
                        has_out: bool = True) -> tuple:
    """``(fn, signature, constexprs, attrs, options)`` for
    ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget('cuda', arch, 32), options=options)``, specialised as a
    launch on a GPU specialises it: 16-byte-aligned pointers (PyTorch's
    allocations and the layer's packed q, k, v are), every int a runtime
    i32 (``do_not_specialize``: one compile for every map size and stride).
    ``has_out``: the backward query kernel reads the forward's output (a
    training step's launch) or walks the halo for delta (the output was
    modified in place).

    Example:
        >>> fn, sig, consts, attrs, opts = compile_source_args('_forward_kernel',
        ...                                                    torch.bfloat16, 32)
    """
    fn = globals()[kernel]
    value_dim = head_dim if value_dim is None else value_dim
    element_size = torch.empty((), dtype=dtype).element_size()
    blocks, options = kernel_config(
        kernel, block_config(head_dim, value_dim, window, element_size), element_size,
        channels_last_layout)
    constexprs = dict(HAS_KEY=has_key, HAS_REL=has_rel,
                      PRODUCTS=2 if tf32 and dtype == torch.float32 else 0,
                      CHANNELS_LAST=channels_last_layout,
                      EVEN=head_dim == blocks['BLOCK_D'] and value_dim == blocks['BLOCK_DV'],
                      **blocks)
    if 'HAS_OUT' in fn.arg_names:
        constexprs['HAS_OUT'] = has_out
    if 'OWNS_DQ' in fn.arg_names:
        constexprs['OWNS_DQ'] = has_out and tables_kernel_owns_dq(
            element_size, max(blocks['BLOCK_D'], blocks['BLOCK_DV']), channels_last_layout)
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
    return fn, signature, constexprs, attrs, options
