"""Rewrites of exported ONNX graphs for the fused ``sasa_mmdet::LocalAttention`` node.

:func:`pack_attention_inputs` hands each fused node its layer's whole q/k/v
projection instead of three pieces of it. A layer's projection is one
``(B, 3, N, D, H, W)`` tensor (``LocalSelfAttention2d.project``); the exporter
records its split into q, k and v as a ``Split`` (a copy of the projection in
onnxruntime) and three ``Squeeze`` nodes. The node reads q, k and v in place
from the packed tensor (its first input, the key and value inputs empty), so
the rewrite removes those four nodes and the copy per layer.

:func:`fuse_attention_epilogues` folds the layers that follow a fused node
into it, as onnxruntime folds them into a convolution: the layer's stride
(an ``AveragePool``), an inference ``BatchNormalization`` and a ``Relu``
become the node's ``pool``, ``scale``/``shift`` and ``activation``.

:func:`deduplicate_constants` merges the exporter's ``Constant`` nodes of
equal value, for every graph (standard operators too).
"""
from typing import Dict, List, Optional

#: The name of the empty float tensor the packed nodes take as key and value.
EMPTY = 'sasa_mmdet_empty'


def _attribute(node, name, default=None):
    from onnx import helper
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _constant(model, name: str):
    """The value of an initializer or Constant node named ``name``, also
    through ``Identity`` nodes (the exporter's shared parameters), else
    None."""
    from onnx import numpy_helper
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if list(node.output) == [name]:
            if node.op_type == 'Identity':
                return _constant(model, node.input[0])
            if node.op_type == 'Constant':
                value = _attribute(node, 'value')
                return None if value is None else numpy_helper.to_array(value)
    return None


def _int_list(model, name: str) -> Optional[List[int]]:
    """The int64 values of a constant named ``name`` (:func:`_constant`),
    or None if it is not a constant."""
    value = _constant(model, name)
    return None if value is None else value.reshape(-1).tolist()


def _squeezed_axes(model, node) -> Optional[List[int]]:
    if len(node.input) > 1:
        return _int_list(model, node.input[1])
    axes = _attribute(node, 'axes')  # opset < 13
    return None if axes is None else list(axes)


def pack_attention_inputs(model) -> int:
    """Give every ``sasa_mmdet::LocalAttention`` node whose query, key and
    value are the three parts of one projection (``Split`` on axis 1 into
    three, each ``Squeeze``\\ d on axis 1) that projection as its query, the
    key and value inputs empty; removes the ``Split`` and ``Squeeze`` nodes
    that nothing else reads. In place.

    With q.r logits only (no key input) the query and value must be parts 0
    and 2. The node's output is unchanged (same numbers: the kernel reads
    the same values).

    Args:
        model (onnx.ModelProto): An exported model.

    Returns:
        int: How many nodes now read a packed projection.

    Example:
        >>> import onnx
        >>> model = onnx.load('demo_sasa_onnxruntime.onnx')
        >>> pack_attention_inputs(model)
        16
    """
    from onnx import TensorProto, helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    packed = 0
    for node in graph.node:
        if node.op_type != 'LocalAttention' or node.domain != 'sasa_mmdet':
            continue
        logits = next((a.s.decode() for a in node.attribute if a.name == 'logits'), None)
        parts = (0, 1, 2) if logits != 'qr' else (0, None, 2)
        split = None
        for index, part in zip(node.input[:3], parts):
            if part is None:
                continue
            squeeze = producer.get(index)
            if squeeze is None or squeeze.op_type != 'Squeeze' or \
                    _squeezed_axes(model, squeeze) != [1]:
                break
            source = producer.get(squeeze.input[0])
            if source is None or source.op_type != 'Split' or \
                    _attribute(source, 'axis', 0) != 1 or len(source.output) != 3 or \
                    source.output[part] != squeeze.input[0] or \
                    (split is not None and source is not split):
                break
            split = source
        else:
            node.input[0] = split.input[0]
            node.input[1] = EMPTY
            node.input[2] = EMPTY
            packed += 1
    if packed:
        if not any(t.name == EMPTY for t in graph.initializer):
            graph.initializer.append(helper.make_tensor(EMPTY, TensorProto.FLOAT, [0], []))
        _remove_unused(model, ('Split', 'Squeeze', 'Constant'))
    return packed


def _remove_unused(model, op_types) -> None:
    """Drop nodes of ``op_types`` none of whose outputs anything reads (a
    node, a subgraph's node or the graph's outputs), until none is left."""
    graph = model.graph
    while True:
        read = _read_names(graph) | {output.name for output in graph.output}
        dead = [i for i, node in enumerate(graph.node)
                if node.op_type in op_types and not any(o in read for o in node.output)]
        if not dead:
            return
        for i in reversed(dead):
            del graph.node[i]


#: The operators of the exporter's shape arithmetic (a flatten's target shape).
_SHAPE_OPS = ('Shape', 'Slice', 'Gather', 'Concat', 'Unsqueeze', 'Squeeze', 'Cast', 'Mul',
              'Div', 'Add', 'Sub', 'Reshape', 'ConstantOfShape', 'Equal', 'Where')


def _stride_pool(node) -> Optional[List[int]]:
    """``[ph, pw]`` if ``node`` is the pool of a layer's stride: kernel and
    strides equal, ceil mode, no padding (a window at the edge averages the
    pixels it covers); else None."""
    kernel = _attribute(node, 'kernel_shape')
    if node.op_type != 'AveragePool' or kernel is None or len(kernel) != 2 or \
            list(_attribute(node, 'strides', [1, 1])) != list(kernel) or \
            _attribute(node, 'ceil_mode', 0) != 1 or any(_attribute(node, 'pads', [0])) or \
            _attribute(node, 'auto_pad', b'NOTSET') not in (b'NOTSET', 'NOTSET') or \
            any(d != 1 for d in _attribute(node, 'dilations', [1, 1])):
        return None
    return list(kernel)


def _batch_norm(model, node):
    """``(scale, shift)`` float32 of an inference ``BatchNormalization``
    whose parameters are constants, else None."""
    import numpy as np
    if node.op_type != 'BatchNormalization' or len(node.output) != 1 or \
            _attribute(node, 'training_mode', 0):
        return None
    params = [_constant(model, name) for name in node.input[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + _attribute(node, 'epsilon', 1e-5))
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def fuse_attention_epilogues(model) -> int:
    """Fold what follows each ``sasa_mmdet::LocalAttention`` node into it:
    after the ``Reshape`` of its ``(B, N, Dv, H, W)`` output to ``(B, N *
    Dv, H, W)``, the layer's stride pool (``AveragePool``, kernel = stride,
    ceil mode), then a ``BatchNormalization`` with constant statistics
    (``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``),
    then a ``Relu``; any of them may be missing, in that order. Each folded
    node must be the only reader of the output before it. In place.

    The node applies them in the same order (attributes ``pool`` and
    ``activation``, inputs ``scale`` and ``shift``), so the outputs are
    the same numbers up to float32 rounding (the BatchNorm's arithmetic is
    reordered, as onnxruntime's fusion of a BatchNorm into a convolution
    reorders it).

    Args:
        model (onnx.ModelProto): An exported model.

    Returns:
        int: How many nodes were folded in.

    Example:
        >>> import onnx
        >>> model = onnx.load('demo_sasa_onnxruntime.onnx')
        >>> fuse_attention_epilogues(model)
        27
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    readers: Dict[str, List] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_reader(name):
        nodes = readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and name not in outputs else None

    def shape_only(node, reshape):
        """Whether ``node`` and what reads it only compute ``reshape``'s
        target shape (the exporter's Shape/Slice/Concat of a flatten)."""
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if current.op_type not in _SHAPE_OPS:
                return False
            for name in current.output:
                if name in outputs:
                    return False
                for reader in readers.get(name, []):
                    if reader is reshape:
                        if list(reshape.input).index(name) != 1:
                            return False
                    else:
                        stack.append(reader)
        return True

    folded, removed, pooled = 0, set(), {}
    for node in list(graph.node):
        if node.op_type != 'LocalAttention' or node.domain != 'sasa_mmdet' or \
                _attribute(node, 'pool') is not None or len(node.input) > 5 or \
                node.output[0] in outputs:
            continue
        reshapes = [n for n in readers.get(node.output[0], []) if n.op_type == 'Reshape']
        if len(reshapes) != 1 or list(reshapes[0].input).index(node.output[0]) != 0:
            continue
        reshape = reshapes[0]
        # the flatten's target shape may be read from the node's output
        if not all(n is reshape or shape_only(n, reshape)
                   for n in readers.get(node.output[0], [])):
            continue
        shape = _int_list(model, reshape.input[1])
        last, chain, pool, affine, relu = reshape, [], None, None, False
        follower = only_reader(last.output[0])
        # a pooled output needs the flatten's target size from the output
        if follower is not None and (shape is None or all(s in (0, -1) for s in shape[2:])):
            pool = _stride_pool(follower)
            if pool is not None:
                last = follower
                chain.append(follower)
                follower = only_reader(last.output[0])
        if follower is not None:
            affine = _batch_norm(model, follower)
            if affine is not None:
                last = follower
                chain.append(follower)
                follower = only_reader(last.output[0])
        if follower is not None and follower.op_type == 'Relu':
            relu, last = True, follower
            chain.append(follower)
        if not chain:
            continue
        if pool is not None:
            node.attribute.append(helper.make_attribute('pool', pool))
        if relu:
            node.attribute.append(helper.make_attribute('activation', 'relu'))
        if affine is not None:
            while len(node.input) < 5:
                node.input.append('')  # no q.r tables
            for suffix, value in zip(('scale', 'shift'), affine):
                name = f'{node.name or node.output[0]}_{suffix}'
                graph.initializer.append(numpy_helper.from_array(value, name))
                node.input.append(name)
        # the Reshape now flattens the finished output; the folded nodes go
        reshape.output[0] = last.output[0]
        removed.update(id(n) for n in chain)
        if pool is not None:
            pooled[node.output[0]] = pool
        folded += len(chain)
    if folded:
        kept = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(kept)
        # shapes recorded for tensors that left the graph go; a pooled
        # output's (onnxruntime folds the flatten's shape arithmetic with it)
        live = {name for n in graph.node for name in n.output}
        kept_info = [v for v in graph.value_info if v.name in live]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
        for info in graph.value_info:
            if info.name in pooled:
                for dim, stride in zip(info.type.tensor_type.shape.dim[3:], pooled[info.name]):
                    if dim.HasField('dim_value'):
                        dim.dim_value = -(-dim.dim_value // stride)
                    else:
                        dim.Clear()
        # the folded BatchNorms' parameters (and the Identity nodes that
        # shared them), unless something else reads them
        _remove_unused(model, ('Identity', 'Constant'))
        read = _read_names(graph) | {i.name for i in graph.input}
        kept_tensors = [t for t in graph.initializer if t.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept_tensors)
    return folded


def deduplicate_constants(model) -> int:
    """Merge the graph's ``Constant`` nodes of equal value into the first
    of them: the exporter records one per use (a reshape's target, an
    unsqueeze's axes), thousands in a detector with dynamic axes. Subgraphs
    that read a merged name read the kept one. Returns how many nodes it
    removed.

    Example:
        >>> import onnx
        >>> model = onnx.load('model.onnx')  # doctest: +SKIP
        >>> deduplicate_constants(model)  # doctest: +SKIP
        6211
    """
    from onnx import numpy_helper
    graph = model.graph
    outputs = {output.name for output in graph.output}
    first: Dict[tuple, str] = {}
    merged: Dict[str, str] = {}
    kept = []
    for node in graph.node:
        value = _attribute(node, 'value') if node.op_type == 'Constant' else None
        if value is not None and len(node.attribute) == 1 and node.output[0] not in outputs:
            key = (value.data_type, tuple(value.dims), numpy_helper.to_array(value).tobytes())
            if key in first:
                merged[node.output[0]] = first[key]
                continue
            first[key] = node.output[0]
        kept.append(node)
    if merged:
        del graph.node[:]
        graph.node.extend(kept)
        _rename_inputs(graph, merged)
        infos = [info for info in graph.value_info if info.name not in merged]
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return len(merged)


def _rename_inputs(graph, names: Dict[str, str]) -> None:
    """Every node of ``graph`` and of its subgraphs reads ``names[n]`` for ``n``."""
    for node in _nodes(graph):
        node.input[:] = [names.get(name, name) for name in node.input]


def _read_names(graph) -> set:
    """Every tensor name that a node of ``graph`` or of its subgraphs reads."""
    return {name for node in _nodes(graph) for name in node.input}


def _nodes(graph):
    """The nodes of ``graph`` and of its subgraphs (an ``If``'s branches, a
    ``Loop``'s body), depth first."""
    from onnx import AttributeProto
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)
