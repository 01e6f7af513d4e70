"""Export backend: local attention as a few standard ONNX operators per layer.

What ``torch.onnx.export`` records for the attention when the graph must
run anywhere (``export_onnx.py --backend onnx``), whatever the window: per
layer a few Gathers and MatMuls and one Softmax, taps on the last axis, no
per-tap chains, no Where.

It works on blocks of ``bh x bw`` query pixels (:data:`BLOCK` = 4 per
axis, or the map if smaller), as neighbourhood-attention kernels do: a
block's queries together reach a ``(bh + kh' - 1) x (bw + kw' - 1)`` halo of
keys (kh', kw': the dilated window's extent), so

- one Gather per tensor collects the query blocks and the key and value
  halos from each head's pixels as rows of D channels (positions outside
  the image are clamped to its border and masked). A layer's own export
  (``LocalSelfAttention2d``) computes q, k and v straight into that layout,
  one MatMul each batched over the heads (:func:`attend_rows`): no Split,
  Squeezes or Transposes before the Gathers;
- the logits are q.k, a batched MatMul ``(bh*bw, D) @ (D, halo)`` per
  block and head, plus each query's terms per halo row and per halo
  column -- its q.r terms (one MatMul per head and in-block position
  against the relative tables laid out per halo row and column,
  :func:`relative_terms_table`, parameters only: folded at export) and the
  mask's bias (:data:`MASKED` for a halo row or column outside the query's
  window or the image, else 0) -- spread over the halo by a constant one-hot
  ``(halo_h + halo_w, halo)``. Keys outside the window get softmax weight
  exactly 0;
- the softmax is over the last axis: one Softmax node, no transposes;
- the weighted sum is one batched MatMul, ``(bh*bw, halo) @ (halo, Dv)``,
  and one Gather puts the blocks' pixels back in image order.

The products over the whole halo cost (halo / window) times the window's
arithmetic (2.6x for a 5 x 5 window, 2x for 7 x 7) but run as a few matrix
products: in onnxruntime (2 threads) the demo detector runs 2.5x (160 x
160) to 3.5x (640 x 640) faster than with the per-tap graph
(``docs/deployment.md``), and a layer has a fixed number of nodes. The
indices and the biases depend only on the map size: with a static input
size the exporter folds them into constants; with dynamic axes they are
shape arithmetic. Numbers: the same function as every backend
(``reference.local_attention_reference``); the softmax runs in float32.

:func:`export_graph` chooses what an export records (:data:`GRAPHS`):
``'onnx'`` this graph; ``'onnxruntime'`` the registered operator, which
``sasa_mmdet.deployment`` exports as one ``sasa_mmdet::LocalAttention``
node run by the package's onnxruntime custom-op library; ``'onnx-per-tap'``
the PyTorch backend's forward, one Slice/Mul/ReduceSum chain per window tap
(the standard graph before this one, kept to compare against).
"""
import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import pytorch
from .geometry import window_offsets

#: Query block size (per axis) of the standard-operator graph.
BLOCK = 4
#: The logit bias of keys outside a query's window or the image: finite (a
#: product with the one-hot channels stays finite), so large that its
#: softmax weight is exactly 0 in float32.
MASKED = -1e30
#: What ``torch.onnx.export`` records for the attention (module docstring).
GRAPHS = ('onnx', 'onnxruntime', 'onnx-per-tap')
_STATE = dict(graph='onnx', dynamic=True)


@contextlib.contextmanager
def export_graph(graph: str, dynamic: bool = True) -> Iterator[None]:
    """Within the block, ONNX exports record the attention as ``graph``.

    Args:
        graph (str): One of :data:`GRAPHS`.
        dynamic (bool): Whether the export has dynamic axes. False lets the
            standard graph read the map size as constants, so that its
            indices and masks fold into constants (fewer nodes); such a
            file only runs at the exported size.

    Example:
        >>> with export_graph('onnxruntime'):
        ...     current_graph()
        'onnxruntime'
    """
    if graph not in GRAPHS:
        raise ValueError(f'graph must be one of {GRAPHS}, got {graph!r}')
    previous = dict(_STATE)
    _STATE.update(graph=graph, dynamic=bool(dynamic))
    try:
        yield
    finally:
        _STATE.update(previous)


def current_graph() -> str:
    """The graph an export records now (:func:`export_graph`; default 'onnx')."""
    return _STATE['graph']


def exporting_static_shapes() -> bool:
    """Whether an ONNX export with static shapes is being recorded
    (:func:`export_graph` with ``dynamic=False``): map sizes are then
    constants, and code may branch on them."""
    return torch.onnx.is_in_onnx_export() and not _STATE['dynamic']


class AxisBlocks:
    """Query blocks and key halos along one axis (rows or columns).

    Args:
        size (int): The map's length along the axis (may be traced).
        block (int): Queries per block.
        window (int), dilation (int): The window along the axis.
    """

    def __init__(self, size, block: int, window: int, dilation: int) -> None:
        offsets = window_offsets(window, dilation)
        self.size, self.block, self.window = size, block, window
        self.before = -offsets[0]
        self.halo = block + offsets[-1] - offsets[0]
        self.blocks = (size + block - 1) // block
        self.offsets = offsets

    def query_positions(self, device=None) -> Tensor:
        """``(blocks, block)``: the pixel of each block query (past the
        map's end for the last block's padding)."""
        start = torch.arange(self.blocks, device=device) * self.block
        return start[:, None] + torch.arange(self.block, device=device)[None]

    def key_positions(self, device=None) -> Tensor:
        """``(blocks, halo)``: the pixel of each halo key (may lie outside)."""
        start = torch.arange(self.blocks, device=device) * self.block - self.before
        return start[:, None] + torch.arange(self.halo, device=device)[None]

    def taps(self) -> Tensor:
        """``(block, halo)`` int64: the window tap of halo key a for block
        query i, or ``window`` where a is outside i's window."""
        table = [[self.window] * self.halo for _ in range(self.block)]
        for i in range(self.block):
            for t, offset in enumerate(self.offsets):
                table[i][i + self.before + offset] = t
        return torch.tensor(table)  # one constant in a traced graph


def _flat_index(rows: Tensor, cols: Tensor, height, width) -> Tensor:
    """Flat pixel index of ``rows[:, None] x cols[None, :]`` grids, per block:
    ``(row blocks, col blocks, len_r, len_c)`` clamped into the image."""
    rows = rows.clamp(0, height - 1)
    cols = cols.clamp(0, width - 1)
    # (Br, 1, r, 1) * W + (1, Bc, 1, c)
    return rows[:, None, :, None] * width + cols[None, :, None, :]


def relative_terms_table(rel_row: Tensor, rel_col: Tensor, rows: AxisBlocks,
                         cols: AxisBlocks) -> Tensor:
    """The relative tables ``(kh, N, Dr)``, ``(kw, N, Dc)`` laid out per
    in-block query and per halo row, then halo column: ``(N, bh * bw, Dr +
    Dc, halo_h + halo_w)``; the query's first Dr channels meet the row part,
    the others the column part; zero elsewhere and outside the window."""
    # The tap of each (query row i, query column j, halo row or column a),
    # the table's zero row where there is none.
    row_taps = torch.cat([rows.taps(), torch.full((rows.block, cols.halo), rows.window)], 1)
    col_taps = torch.cat([torch.full((cols.block, rows.halo), cols.window), cols.taps()], 1)
    row_taps = row_taps[:, None].expand(-1, cols.block, -1)  # (bh, bw, halo_h + halo_w)
    col_taps = col_taps[None].expand(rows.block, -1, -1)
    terms = torch.cat([_zero_padded(rel_row)[row_taps.to(rel_row.device)],
                       _zero_padded(rel_col)[col_taps.to(rel_col.device)]], dim=-1)
    heads, dim = terms.shape[-2:]  # terms: (bh, bw, halo_h + halo_w, N, D)
    return terms.permute(3, 0, 1, 4, 2).reshape(heads, rows.block * cols.block, dim, -1)


def _zero_padded(table: Tensor) -> Tensor:
    """``(k, N, Dr)`` and a zero row after it: ``(k + 1, N, Dr)``."""
    return torch.cat([table, table.new_zeros(1, *table.shape[1:])])


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, recording nothing when it is that dtype already."""
    return x if x.dtype == dtype else x.to(dtype)


def forward(query: Tensor, key: Optional[Tensor], value: Tensor,
            rel_row: Optional[Tensor], rel_col: Optional[Tensor], window, dilation,
            keep_attention: bool = False) -> Tuple[Tensor, Tensor]:
    """Local attention in standard operators (module docstring);
    ``(out, empty)`` like the other backends' forward (no map is kept:
    nothing differentiates it).

    Args:
        query, key (Tensor): ``(B, N, D, H, W)``; key may be None (q.r only).
        value (Tensor): ``(B, N, Dv, H, W)``.
        rel_row, rel_col (Tensor, optional): ``(kh, N, Dr)``, ``(kw, N, Dc)``.
        window, dilation (tuple[int]): ``(kh, kw)`` and ``(dh, dw)``.

    Returns:
        tuple[Tensor]: ``(B, N, Dv, H, W)`` in v's dtype, and an empty tensor.

    Example:
        >>> q = k = v = torch.rand(1, 2, 4, 5, 6)
        >>> forward(q, k, v, None, None, (3, 3), (1, 1))[0].shape
        torch.Size([1, 2, 4, 5, 6])
    """
    dtype = torch.promote_types(value.dtype, torch.float32)
    batch, heads, _, height, width = query.shape

    def pixel_rows(x: Optional[Tensor]) -> Optional[Tensor]:
        # (B, N, D, H, W) -> each head's pixels as rows of D channels: (B, N, H * W, D)
        if x is None:
            return None
        return _cast(x, dtype).reshape(batch, heads, x.shape[2], -1).transpose(-1, -2)

    out = _attend(pixel_rows(query), pixel_rows(key), pixel_rows(value), (height, width),
                  rel_row, rel_col, window, dilation)
    return _cast(out, value.dtype), out.new_empty(0)


def attend_rows(query: Tensor, key: Optional[Tensor], value: Tensor, size,
                rel_row: Optional[Tensor], rel_col: Optional[Tensor], window,
                dilation) -> Tensor:
    """:func:`forward` on maps given as each head's pixels in rows of
    channels, the layout its Gathers read: a layer's export computes its
    projections straight into it (one MatMul per tensor, batched over the
    heads), with no Split, Squeezes or Transposes before the Gathers.

    Args:
        query, key (Tensor): ``(B, N, H * W, D)``, row-major pixels; key may
            be None (q.r only).
        value (Tensor): ``(B, N, H * W, Dv)``.
        size (tuple): ``(H, W)``.
        rel_row, rel_col, window, dilation: as for :func:`forward`.

    Returns:
        Tensor: ``(B, N, Dv, H, W)``, in float32 or wider.

    Example:
        >>> q = k = v = torch.rand(1, 2, 5 * 6, 4)
        >>> attend_rows(q, k, v, (5, 6), None, None, (3, 3), (1, 1)).shape
        torch.Size([1, 2, 4, 5, 6])
    """
    dtype = torch.promote_types(value.dtype, torch.float32)
    query, value = _cast(query, dtype), _cast(value, dtype)
    key = None if key is None else _cast(key, dtype)
    return _attend(query, key, value, size, rel_row, rel_col, window, dilation)


def _blocks(rows: Tensor, pixel_index: Tensor, length: int) -> Tensor:
    """``(B, N, blocks, length, D)``: the rows ``(B, N, H * W, D)`` of the
    pixels ``pixel_index`` ``(blocks * length,)``, in one Gather."""
    return rows[:, :, pixel_index.reshape(-1, length)]


def _attend(query: Tensor, key: Optional[Tensor], value: Tensor, size,
            rel_row: Optional[Tensor], rel_col: Optional[Tensor], window,
            dilation) -> Tensor:
    """The graph of :func:`forward` on each head's pixel rows ``(B, N, H *
    W, D)``: ``(B, N, Dv, H, W)``."""
    window, dilation = tuple(window), tuple(dilation)
    dtype, device = query.dtype, query.device
    batch, heads = query.shape[:2]
    heads = int(heads)  # never a dynamic axis
    height, width = size
    if exporting_static_shapes():
        # constants: the indices fold, the reshapes need no shape arithmetic
        batch, height, width = int(batch), int(height), int(width)
    rows = AxisBlocks(height, min(BLOCK, int(height)), window[0], dilation[0])
    cols = AxisBlocks(width, min(BLOCK, int(width)), window[1], dilation[1])
    blocks = rows.blocks * cols.blocks
    block_size, halo = rows.block * cols.block, rows.halo * cols.halo
    # Gather indices: (blocks * block_size,) queries, (blocks * halo,) keys.
    query_index = _flat_index(rows.query_positions(device), cols.query_positions(device),
                              height, width).reshape(-1)
    key_rows, key_cols = rows.key_positions(device), cols.key_positions(device)
    key_index = _flat_index(key_rows, key_cols, height, width).reshape(-1)
    # Where each pixel sits among the blocks' queries (to put them back).
    pixel_rows = torch.arange(height, device=device)
    pixel_cols = torch.arange(width, device=device)
    block_of = ((pixel_rows // rows.block)[:, None] * cols.blocks +
                (pixel_cols // cols.block)[None, :])
    inside_block = ((pixel_rows % rows.block)[:, None] * cols.block +
                    (pixel_cols % cols.block)[None, :])
    pixel_index = (block_of * block_size + inside_block).reshape(-1)
    # The mask, separable: a halo key counts for a query where its row and
    # its column both lie in the query's window and inside the image. As a
    # bias of 0 or MASKED per (query, halo row) and per (query, halo column).
    row_allowed = ((rows.taps() < window[0]).to(device)[None] &  # (row blocks, bh, halo_h)
                   ((key_rows >= 0) & (key_rows < height))[:, None, :])
    col_allowed = ((cols.taps() < window[1]).to(device)[None] &  # (col blocks, bw, halo_w)
                   ((key_cols >= 0) & (key_cols < width))[:, None, :])
    masked = torch.tensor(MASKED, dtype=dtype, device=device)
    zero = torch.tensor(0.0, dtype=dtype, device=device)
    # (row blocks, 1, bh, 1, halo_h + halo_w) and (1, col blocks, 1, bw, halo_h
    # + halo_w): the row part, then the column part, the other part 0.
    row_bias = torch.where(row_allowed, zero, masked)
    col_bias = torch.where(col_allowed, zero, masked)
    row_bias = F.pad(row_bias, (0, cols.halo))[:, None, :, None, :]
    col_bias = F.pad(col_bias, (rows.halo, 0))[None, :, None, :, :]

    queries = _blocks(query, query_index, block_size)  # (B, N, blocks, bh * bw, D)
    # Per query, the logit terms that depend on the key's halo row only and
    # on its column only, (.., bh * bw, halo_h + halo_w): q.r (if any) plus
    # the mask's bias.
    if rel_row is not None:
        # One matrix product per head and in-block position: the queries go
        # (N, bh * bw, B * blocks, D) and meet that position's tables
        # (N, bh * bw, D, halo_h + halo_w); a few large products.
        table = relative_terms_table(_cast(rel_row, dtype), _cast(rel_col, dtype), rows, cols)
        grid = queries.permute(1, 3, 0, 2, 4).reshape(heads, block_size, -1, table.shape[-2])
        terms = torch.matmul(grid, table)  # (N, bh * bw, B * blocks, halo_h + halo_w)
        terms = terms.reshape(heads, rows.block, cols.block, -1, rows.blocks, cols.blocks,
                              rows.halo + cols.halo)
        terms = terms + row_bias.permute(2, 3, 0, 1, 4)[:, :, None]  # (bh, 1, 1, Bh, 1, ..)
        terms = terms + col_bias.permute(2, 3, 0, 1, 4)[:, :, None]  # (1, bw, 1, 1, Bw, ..)
        terms = terms.permute(3, 0, 4, 5, 1, 2, 6).reshape(-1, heads, blocks, block_size,
                                                           rows.halo + cols.halo)
    else:
        terms = (row_bias + col_bias).reshape(blocks, block_size, -1)
    # The terms reach each halo key through a one-hot of its halo row and
    # column: (.., bh * bw, halo_h + halo_w) @ (halo_h + halo_w, halo), a
    # small constant that the MatMul broadcasts over the blocks.
    halo_rows = torch.arange(halo, device=device) // cols.halo
    halo_cols = torch.arange(halo, device=device) % cols.halo
    one_hot = torch.cat([
        (torch.arange(rows.halo, device=device)[:, None] == halo_rows[None]),
        (torch.arange(cols.halo, device=device)[:, None] == halo_cols[None])], dim=0)
    logits = torch.matmul(terms, one_hot.to(dtype))  # (B, N, blocks, bh * bw, halo)
    if key is not None:
        keys = _blocks(key, key_index, halo)  # (B, N, blocks, halo, D)
        logits = torch.matmul(queries, keys.transpose(-1, -2)) + logits
    attn = logits.softmax(dim=-1)

    values = _blocks(value, key_index, halo)  # (B, N, blocks, halo, Dv)
    out = torch.matmul(attn, values)  # (B, N, blocks, bh * bw, Dv)
    dim_v = int(value.shape[-1])  # never a dynamic axis
    out = out.reshape(batch, heads, -1, dim_v)
    out = out.index_select(2, pixel_index)  # (B, N, H * W, Dv)
    return out.transpose(-1, -2).reshape(-1, heads, dim_v, height, width)


def export_forward(query: Tensor, key: Optional[Tensor], value: Tensor,
                   rel_row: Optional[Tensor], rel_col: Optional[Tensor], window,
                   dilation) -> Tensor:
    """The attention as the current export graph records it
    (:func:`export_graph`); called by ``local_attention`` under
    ``torch.onnx.export``."""
    graph = current_graph()
    if graph == 'onnx':
        return forward(query, key, value, rel_row, rel_col, window, dilation)[0]
    if graph == 'onnx-per-tap':
        return pytorch.forward(query, key, value, rel_row, rel_col, window, dilation,
                               False)[0]
    # 'onnxruntime': the registered op, which the symbolic registered by
    # sasa_mmdet.deployment turns into one sasa_mmdet::LocalAttention node.
    # The tracer runs it too (its output feeds the rest of the trace).
    from .cpu import KERNEL_BUILT
    backend = 'cpp' if KERNEL_BUILT and query.device.type == 'cpu' else 'torch'
    return torch.ops.sasa_mmdet.local_attention(query, key, value, rel_row, rel_col,
                                                list(window), list(dilation), backend,
                                                False)[0]
