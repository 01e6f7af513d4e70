"""Rewrites of exported ONNX graphs for the fused ``sasa_mmdet::LocalAttention`` node.

:func:`pack_attention_inputs` hands each fused node its layer's whole q/k/v
projection instead of three pieces of it. A layer's projection is one
``(B, 3, N, D, H, W)`` tensor (``LocalSelfAttention2d.project``); the exporter
records its split into q, k and v as a ``Split`` (a copy of the projection in
onnxruntime) and three ``Squeeze`` nodes. The node reads q, k and v in place
from the packed tensor (its first input, the key and value inputs empty), so
the rewrite removes those four nodes and the copy per layer.
"""
from typing import Dict, List, Optional

#: The name of the empty float tensor the packed nodes take as key and value.
EMPTY = 'sasa_mmdet_empty'


def _int_list(model, name: str) -> Optional[List[int]]:
    """The int64 values of a constant (initializer or Constant node) named
    ``name``, or None if it is not a constant."""
    from onnx import numpy_helper
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor).reshape(-1).tolist()
    for node in model.graph.node:
        if node.op_type == 'Constant' and list(node.output) == [name]:
            for attr in node.attribute:
                if attr.name == 'value':
                    return numpy_helper.to_array(attr.t).reshape(-1).tolist()
    return None


def _squeezed_axes(model, node) -> Optional[List[int]]:
    if len(node.input) > 1:
        return _int_list(model, node.input[1])
    for attr in node.attribute:  # opset < 13
        if attr.name == 'axes':
            return list(attr.ints)
    return None


def _split_axis(node) -> int:
    for attr in node.attribute:
        if attr.name == 'axis':
            return attr.i
    return 0


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
            if source is None or source.op_type != 'Split' or _split_axis(source) != 1 or \
                    len(source.output) != 3 or source.output[part] != squeeze.input[0] or \
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
    """Drop nodes of ``op_types`` none of whose outputs anything reads,
    until none is left."""
    graph = model.graph
    while True:
        read: Dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                read[name] = read.get(name, 0) + 1
        for output in graph.output:
            read[output.name] = 1
        dead = [i for i, node in enumerate(graph.node)
                if node.op_type in op_types and not any(read.get(o) for o in node.output)]
        if not dead:
            return
        for i in reversed(dead):
            del graph.node[i]
