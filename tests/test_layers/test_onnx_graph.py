"""The attention's ONNX graphs: the standard-operator graph
(backends/onnx_graph.py) and the fused sasa_mmdet::LocalAttention node with
its onnxruntime library, each against the reference, in onnxruntime."""
import numpy as np
import onnx
import pytest
import torch

from sasa_mmdet.deployment import (CUSTOM_DOMAIN, deduplicate_constants,
                                   fuse_attention_epilogues, onnxruntime_ops_available,
                                   onnxruntime_ops_path, pack_attention_inputs,
                                   register_onnx_symbolic)
from sasa_mmdet.layers import LocalSelfAttention2d
from sasa_mmdet.layers.backends import onnx_graph
from sasa_mmdet.layers.backends.reference import local_attention_reference

ort = pytest.importorskip('onnxruntime')

# (H, W, window, dilation, D, Dv, with q.k, with q.r): odd sizes, maps not a
# multiple of the block, smaller than the window, even windows, dilations.
CASES = [
    (5, 7, (3, 3), (1, 1), 4, 4, True, True),
    (6, 5, (4, 2), (2, 1), 6, 3, True, True),
    (2, 3, (7, 7), (1, 1), 4, 4, False, True),
    (9, 8, (5, 5), (2, 3), 4, 5, True, False),
    (1, 1, (3, 3), (1, 1), 2, 2, True, True),
    (11, 13, (7, 7), (1, 1), 8, 8, True, True),
]


def _inputs(case, dtype=torch.float32, batch=2, heads=3):
    height, width, window, _, dim, dim_v, with_key, with_rel = case
    generator = torch.Generator().manual_seed(height * 100 + width)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    query = rand(batch, heads, dim, height, width)
    key = rand(batch, heads, dim, height, width) if with_key else None
    value = rand(batch, heads, dim_v, height, width)
    rel_row = rand(window[0], heads, dim // 2) if with_rel else None
    rel_col = rand(window[1], heads, dim - dim // 2) if with_rel else None
    return query, key, value, rel_row, rel_col


@pytest.mark.parametrize('case', CASES)
def test_standard_graph_equals_reference(case):
    query, key, value, rel_row, rel_col = _inputs(case, torch.float64)
    window, dilation = case[2], case[3]
    out, empty = onnx_graph.forward(query, key, value, rel_row, rel_col, window, dilation)
    want = local_attention_reference(query, key, value, window, dilation, rel_row, rel_col)
    assert empty.numel() == 0 and out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('case', CASES)
def test_standard_graph_on_pixel_rows_equals_reference(case):
    """attend_rows: the maps as each head's pixels in rows of channels."""
    query, key, value, rel_row, rel_col = _inputs(case, torch.float64)
    height, width = query.shape[-2:]

    def rows(x):
        return None if x is None else x.flatten(3).transpose(-1, -2).contiguous()

    out = onnx_graph.attend_rows(rows(query), rows(key), rows(value), (height, width), rel_row,
                                 rel_col, case[2], case[3])
    want = local_attention_reference(query, key, value, case[2], case[3], rel_row, rel_col)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_neighbour_tables():
    rows = onnx_graph.AxisBlocks(5, 4, 3, 2)  # 3 taps at -2, 0, +2
    assert (rows.before, rows.halo, rows.blocks) == (2, 8, 2)
    assert rows.taps()[1].tolist() == [3, 0, 3, 1, 3, 2, 3, 3]
    assert rows.key_positions()[1].tolist() == list(range(2, 10))
    with pytest.raises(ValueError, match='graph must be one of'):
        with onnx_graph.export_graph('tensorrt'):
            pass
    assert onnx_graph.current_graph() == 'onnx'


class _Op(torch.nn.Module):

    def __init__(self, case, rel_row, rel_col):
        super().__init__()
        self.window, self.dilation = case[2], case[3]
        self.rel_row, self.rel_col = rel_row, rel_col

    def forward(self, query, key, value):
        from sasa_mmdet.layers.local_attention_ops import local_attention
        return local_attention(query, key, value, self.window, self.dilation, self.rel_row,
                               self.rel_col)


def _export_and_run(case, graph, path, dynamic=False, library=False):
    query, key, value, rel_row, rel_col = _inputs(case)
    module = _Op(case, rel_row, rel_col)
    key_in = key if key is not None else torch.zeros(0)
    names = ['query', 'key', 'value']

    class Wrapped(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.op = module

        def forward(self, q, k, v):
            return self.op(q, k if key is not None else None, v)

    axes = {name: {0: 'batch', 3: 'height', 4: 'width'} for name in ('query', 'value')}
    if key is not None:
        axes['key'] = axes['query']
    with torch.no_grad(), onnx_graph.export_graph(graph):
        torch.onnx.export(Wrapped(), (query, key_in, value), str(path), input_names=names,
                          output_names=['out'], opset_version=17, dynamo=False,
                          dynamic_axes=axes if dynamic else None)
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(onnxruntime_ops_path())
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    return session, (query, key, value, rel_row, rel_col)


def _run(session, query, key, value):
    feed = {'query': query.numpy(), 'value': value.numpy()}
    if key is not None:
        feed['key'] = key.numpy()
    inputs = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in inputs})[0]


@pytest.mark.parametrize('case', CASES[:4])
def test_standard_graph_in_onnxruntime(case, tmp_path):
    path = tmp_path / 'attention.onnx'
    session, (query, key, value, rel_row, rel_col) = _export_and_run(
        case, 'onnx', path, dynamic=True)
    model = onnx.load(str(path))
    assert {node.domain for node in model.graph.node} <= {'', 'ai.onnx'}
    ops = [node.op_type for node in model.graph.node]
    assert ops.count('Softmax') == 1 and 'Transpose' not in ops[ops.index('Softmax') + 1:][:1]
    window, dilation = case[2], case[3]
    want = local_attention_reference(query, key, value, window, dilation, rel_row, rel_col)
    np.testing.assert_allclose(_run(session, query, key, value), want.numpy(), rtol=1e-5,
                               atol=1e-5)
    # the same file on another batch and map size (dynamic axes)
    other = (case[0] + 3, case[1] + 5) + case[2:]
    query, key, value, _, _ = _inputs(other, batch=1)
    want = local_attention_reference(query, key, value, window, dilation, rel_row, rel_col)
    np.testing.assert_allclose(_run(session, query, key, value), want.numpy(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize('encoding,logits,stride,dynamic', [
    ('relative', 'qk+qr', 1, True), ('relative', 'qr', 2, False), ('none', 'qk+qr', 1, False),
    ('absolute', 'qk+qr', 1, False)])
def test_attention_layer_standard_export_matches_pytorch(encoding, logits, stride, dynamic,
                                                         tmp_path):
    """A layer exported with the standard graph: q, k and v projected
    straight into pixel rows, which the Gathers read ('absolute' changes the
    key after the projection and takes the planar path), the layer's
    numbers in onnxruntime."""
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(8, 12, 5, stride=stride, num_heads=3,
                                 position_encoding=encoding, logits=logits).eval()
    x = torch.randn(2, 8, 9, 11)
    path = str(tmp_path / 'layer.onnx')
    with torch.no_grad(), onnx_graph.export_graph('onnx', dynamic=dynamic):
        torch.onnx.export(layer, (x, ), path, input_names=['x'], output_names=['out'],
                          opset_version=17, dynamo=False,
                          dynamic_axes={'x': {0: 'b', 2: 'h', 3: 'w'}} if dynamic else None)
    nodes = onnx.load(path).graph.node
    readers = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    # MatMuls whose output only Gathers read (and Shape, with dynamic axes):
    # the projections, straight into pixel rows
    projections = [n for n in nodes
                   if n.op_type == 'MatMul' and readers[n.output[0]] <= {'Gather', 'Shape'}]
    assert len(projections) == {'absolute': 0, 'relative': 3 if logits == 'qk+qr' else 2,
                                'none': 3}[encoding]
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    sizes = [(9, 11), (6, 13)] if dynamic else [(9, 11)]
    for height, width in sizes:
        x = torch.randn(2, 8, height, width)
        with torch.no_grad():
            want = layer(x).numpy()
        np.testing.assert_allclose(session.run(None, {'x': x.numpy()})[0], want, rtol=1e-5,
                                   atol=1e-5)


def test_deduplicate_constants_merges_equal_values(tmp_path):
    """The exporter's Constant nodes of equal value become one; the graph
    computes the same."""
    layer = LocalSelfAttention2d(8, 8, 5, num_heads=2).eval()
    path = str(tmp_path / 'layer.onnx')
    with torch.no_grad(), onnx_graph.export_graph('onnx', dynamic=True):
        torch.onnx.export(layer, (torch.randn(1, 8, 9, 7), ), path, input_names=['x'],
                          opset_version=17, dynamo=False,
                          dynamic_axes={'x': {0: 'b', 2: 'h', 3: 'w'}})
    model = onnx.load(path)

    def constants(m):
        return [onnx.numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node
                if n.op_type == 'Constant']

    before = len(constants(model))
    removed = deduplicate_constants(model)
    values = constants(model)
    assert removed > 0 and len(values) == before - removed
    keys = [(v.dtype, v.shape, v.tobytes()) for v in values]
    assert len(set(keys)) == len(keys)
    assert deduplicate_constants(model) == 0
    onnx.checker.check_model(model)
    x = torch.randn(2, 8, 6, 11)
    want = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(
        None, {'x': x.numpy()})[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider']
                               ).run(None, {'x': x.numpy()})[0]
    np.testing.assert_array_equal(got, want)


needs_library = pytest.mark.skipif(
    not onnxruntime_ops_available(),
    reason='the onnxruntime custom-op library is not built (no onnxruntime headers)')


#: What $SASA_MMDET_ONNXRUNTIME_ISA may choose (the library's default is the
#: best the CPU has).
ISAS = ('baseline', 'avx2', 'avx512')


def _isa_session(path, isa, monkeypatch, threads=0):
    """A session of ``path`` whose fused nodes run the kernel compiled for
    ``isa`` (on ``threads`` intra-op threads; 0: onnxruntime's default);
    None when this CPU does not have it."""
    monkeypatch.setenv('SASA_MMDET_ONNXRUNTIME_ISA', isa)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(onnxruntime_ops_path())
    try:
        return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as error:  # onnxruntime's own exception types
        if f'this CPU does not have {isa}' in str(error):
            return None
        raise


@needs_library
@pytest.mark.parametrize('case', CASES)
def test_fused_node_in_onnxruntime(case, tmp_path, monkeypatch):
    register_onnx_symbolic(17)
    path = tmp_path / 'fused.onnx'
    session, (query, key, value, rel_row, rel_col) = _export_and_run(
        case, 'onnxruntime', path, dynamic=True, library=True)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.domain == CUSTOM_DOMAIN]
    assert [n.op_type for n in nodes] == ['LocalAttention']
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    window, dilation = case[2], case[3]
    logits = {(True, True): b'qk+qr', (True, False): b'qk', (False, True): b'qr'}[case[6:8]]
    assert attributes == dict(window=list(window), dilation=list(dilation), heads=3,
                              logits=logits)
    other = (case[0] + 2, case[1] + 9) + case[2:]
    batches = [(query, key, value), _inputs(other, batch=1)[:3]]
    # the kernel compiled for every instruction set this CPU has
    for isa in ISAS:
        session = _isa_session(str(path), isa, monkeypatch)
        if session is None:
            continue
        for q, k, v in batches:
            want = local_attention_reference(q, k, v, window, dilation, rel_row, rel_col)
            np.testing.assert_allclose(_run(session, q, k, v), want.numpy(), rtol=1e-5,
                                       atol=1e-5, err_msg=isa)


def _fused_node_file(path, inputs, logits) -> str:
    """Writes a model of one ``LocalAttention`` node (window 3, 2 heads) with
    float inputs named ``inputs`` and output 'y' to ``path``."""
    from onnx import TensorProto, helper
    node = helper.make_node('LocalAttention', list(inputs), ['y'], domain=CUSTOM_DOMAIN,
                            window=[3, 3], dilation=[1, 1], heads=2, logits=logits)
    graph = helper.make_graph(
        [node], 'g', [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17),
                                                    helper.make_opsetid(CUSTOM_DOMAIN, 1)])
    onnx.save(model, str(path))
    return str(path)


@needs_library
def test_fused_node_rejects_bad_inputs(tmp_path):
    path = _fused_node_file(tmp_path / 'bad.onnx', 'qkvrc', 'qk+qr')
    options = ort.SessionOptions()
    options.register_custom_ops_library(onnxruntime_ops_path())
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4, 5, 5)).astype(np.float32)
    ok = dict(q=q, k=q, v=q, r=np.zeros((3, 2, 2), np.float32), c=np.zeros((3, 2, 2), np.float32))
    assert session.run(None, ok)[0].shape == (1, 2, 4, 5, 5)
    with pytest.raises(Exception, match='query has 3 heads, the node says 2'):
        bad = np.zeros((1, 3, 4, 5, 5), np.float32)
        session.run(None, dict(ok, q=bad, k=bad, v=bad))
    with pytest.raises(Exception, match=r'rel_row and rel_col must be \(kh, N, Dr\)'):
        session.run(None, dict(ok, r=np.zeros((2, 2, 2), np.float32)))


@needs_library
def test_attention_layer_fused_export_matches_pytorch(tmp_path):
    """A whole layer (projection, attention, stride pool) with the fused node."""
    register_onnx_symbolic(17)
    torch.manual_seed(0)
    layer = LocalSelfAttention2d(8, 8, 5, stride=2, num_heads=2).eval()
    x = torch.randn(1, 8, 11, 9)
    path = str(tmp_path / 'layer.onnx')
    with torch.no_grad(), onnx_graph.export_graph('onnxruntime'):
        torch.onnx.export(layer, (x, ), path, input_names=['x'], opset_version=17,
                          dynamo=False)
    options = ort.SessionOptions()
    options.register_custom_ops_library(onnxruntime_ops_path())
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    with torch.no_grad():
        want = layer(x).numpy()
    np.testing.assert_allclose(session.run(None, {'x': x.numpy()})[0], want, rtol=1e-5,
                               atol=1e-5)


@needs_library
@pytest.mark.parametrize('encoding,logits', [('relative', 'qk+qr'), ('none', 'qk+qr'),
                                             ('relative', 'qr')])
def test_packed_fused_node_matches_pytorch(encoding, logits, tmp_path, monkeypatch):
    """pack_attention_inputs: each node reads its layer's projection in place,
    the Split and Squeezes are gone, the numbers are the layer's."""
    register_onnx_symbolic(17)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        LocalSelfAttention2d(8, 8, 3, num_heads=2, position_encoding=encoding, logits=logits),
        LocalSelfAttention2d(8, 12, 5, stride=2, num_heads=3, dilation=2,
                             position_encoding=encoding, logits=logits)).eval()
    x = torch.randn(2, 8, 11, 9)
    path = str(tmp_path / 'layers.onnx')
    with torch.no_grad(), onnx_graph.export_graph('onnxruntime'):
        torch.onnx.export(model, (x, ), path, input_names=['x'], opset_version=17,
                          dynamo=False, dynamic_axes={'x': {0: 'b', 2: 'h', 3: 'w'}})
    exported = onnx.load(path)
    assert pack_attention_inputs(exported) == 2
    ops = [node.op_type for node in exported.graph.node]
    assert 'Split' not in ops and 'Squeeze' not in ops and ops.count('LocalAttention') == 2
    onnx.save(exported, path)
    # the last is large enough (over 2**20 multiply-adds a node) to run on
    # onnxruntime's thread pool
    inputs = [x, x[:1, :, :7, :10], torch.randn(2, 8, 64, 48)]
    with torch.no_grad():
        want = [model(batch).numpy() for batch in inputs]
    for isa in ISAS:
        session = _isa_session(path, isa, monkeypatch)
        if session is not None:
            for batch, out in zip(inputs, want):
                np.testing.assert_allclose(session.run(None, {'x': batch.numpy()})[0], out,
                                           rtol=1e-5, atol=1e-5, err_msg=isa)
    assert pack_attention_inputs(exported) == 0  # nothing left to pack


class _Epilogues(torch.nn.Module):
    """Attention layers followed by what fuse_attention_epilogues folds: a
    stride, BatchNorm and ReLU (the pooled path); BatchNorm and ReLU (applied
    by the kernel as it stores); and a BatchNorm whose output is also an
    output of the model (folded alone: its ReLU stays a node)."""

    def __init__(self, encoding):
        super().__init__()
        kwargs = dict(num_heads=2, position_encoding=encoding)
        self.attention = torch.nn.ModuleList([
            LocalSelfAttention2d(8, 8, 3, stride=2, **kwargs),
            LocalSelfAttention2d(8, 12, 5, dilation=2, **kwargs),
            LocalSelfAttention2d(12, 8, 3, **kwargs)])
        self.norm = torch.nn.ModuleList(torch.nn.BatchNorm2d(c) for c in (8, 12, 8))
        for norm in self.norm:  # statistics other than the identity's
            torch.nn.init.uniform_(norm.weight, 0.5, 2)
            torch.nn.init.normal_(norm.bias)
            torch.nn.init.normal_(norm.running_mean)
            torch.nn.init.uniform_(norm.running_var, 0.5, 2)

    def forward(self, x):
        x = torch.relu(self.norm[0](self.attention[0](x)))
        x = torch.relu(self.norm[1](self.attention[1](x)))
        y = self.norm[2](self.attention[2](x))
        return torch.relu(y), y


@needs_library
@pytest.mark.parametrize('encoding', ['relative', 'none'])  # q.k + q.r, q.k
def test_fused_epilogues_match_pytorch(encoding, tmp_path, monkeypatch):
    """fuse_attention_epilogues: the stride pool, BatchNorms and ReLU after
    the fused nodes become their attributes and inputs, on odd map sizes
    (the pool's ceil mode), with the same numbers as the layers."""
    register_onnx_symbolic(17)
    torch.manual_seed(0)
    model = _Epilogues(encoding).eval()
    x = torch.randn(2, 8, 11, 9)
    path = str(tmp_path / 'epilogues.onnx')
    with torch.no_grad(), onnx_graph.export_graph('onnxruntime'):
        torch.onnx.export(model, (x, ), path, input_names=['x'], output_names=['relu', 'y'],
                          opset_version=17, dynamo=False,
                          dynamic_axes={'x': {0: 'b', 2: 'h', 3: 'w'}})
    exported = onnx.load(path)
    pack_attention_inputs(exported)
    assert fuse_attention_epilogues(exported) == 6  # pool, BN, ReLU; BN, ReLU; BN
    ops = [node.op_type for node in exported.graph.node]
    assert 'AveragePool' not in ops and 'BatchNormalization' not in ops
    assert ops.count('Relu') == 1  # the last BatchNorm's output is read twice
    nodes = [n for n in exported.graph.node if n.op_type == 'LocalAttention']
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                  for n in nodes]
    assert attributes[0]['pool'] == [2, 2] and attributes[0]['activation'] == b'relu'
    assert 'pool' not in attributes[1] and attributes[1]['activation'] == b'relu'
    assert 'pool' not in attributes[2] and 'activation' not in attributes[2]
    assert [len(n.input) for n in nodes] == [7, 7, 7]
    onnx.checker.check_model(exported)
    onnx.save(exported, path)
    # rows of whole blocks; the last large enough (over 2**20 multiply-adds a
    # node) to run on two threads
    inputs = [x, torch.randn(1, 8, 7, 10), torch.randn(1, 8, 34, 32), torch.randn(1, 8, 96, 96)]
    with torch.no_grad():
        want = [model(batch) for batch in inputs]
    for isa in ISAS:
        session = _isa_session(path, isa, monkeypatch, threads=2)
        if session is not None:
            for batch, outs in zip(inputs, want):
                for got, out in zip(session.run(None, {'x': batch.numpy()}), outs):
                    np.testing.assert_allclose(got, out.numpy(), rtol=1e-5, atol=1e-5,
                                               err_msg=isa)
    assert fuse_attention_epilogues(exported) == 0  # nothing left to fold


@needs_library
def test_fused_epilogue_rejects_bad_inputs(tmp_path, monkeypatch):
    from onnx import TensorProto, helper
    path = _fused_node_file(tmp_path / 'epilogue.onnx', 'qkv', 'qk')
    model = onnx.load(path)
    node = model.graph.node[0]
    node.input.extend(['', '', 'scale', 'shift'])
    node.attribute.extend([helper.make_attribute('pool', [2, 2]),
                           helper.make_attribute('activation', 'relu')])
    model.graph.input.extend(
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ('scale', 'shift')])
    onnx.save(model, path)
    session = _isa_session(path, 'baseline', monkeypatch)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4, 5, 7)).astype(np.float32)
    scale, shift = rng.standard_normal((2, 8)).astype(np.float32)
    out = session.run(None, dict(q=q, k=q, v=q, scale=scale, shift=shift))[0]
    attention = local_attention_reference(*[torch.from_numpy(q)] * 3, (3, 3), (1, 1))
    pooled = torch.nn.functional.avg_pool2d(attention.flatten(1, 2), 2, ceil_mode=True)
    want = torch.relu(pooled * torch.from_numpy(scale)[:, None, None] +
                      torch.from_numpy(shift)[:, None, None])
    assert out.shape == (1, 2, 4, 3, 4)
    np.testing.assert_allclose(out.reshape(1, 8, 3, 4), want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match=r'scale and shift must be \(N \* Dv\) = \(8\)'):
        session.run(None, dict(q=q, k=q, v=q, scale=scale[:4], shift=shift))
    unpaired = onnx.load(path)
    del unpaired.graph.node[0].input[-1]  # scale without shift
    onnx.save(unpaired, str(tmp_path / 'unpaired.onnx'))
    session = _isa_session(str(tmp_path / 'unpaired.onnx'), 'baseline', monkeypatch)
    with pytest.raises(Exception, match='scale and shift .inputs 5 and 6. come together'):
        session.run(None, dict(q=q, k=q, v=q, scale=scale, shift=shift))
    for name, value, message in [('pool', [0, 2], 'pool must be two positive ints'),
                                 ('activation', 'gelu', "activation must be 'none' or 'relu'")]:
        bad = onnx.load(path)
        for attr in bad.graph.node[0].attribute:
            if attr.name == name:
                attr.CopyFrom(helper.make_attribute(name, value))
        onnx.save(bad, str(tmp_path / 'bad.onnx'))
        with pytest.raises(Exception, match=message):
            _isa_session(str(tmp_path / 'bad.onnx'), 'baseline', monkeypatch)


@needs_library
def test_packed_fused_node_rejects_bad_inputs(tmp_path, monkeypatch):
    path = _fused_node_file(tmp_path / 'packed.onnx', 'qkv', 'qk')
    session = _isa_session(path, 'baseline', monkeypatch)
    packed = np.random.default_rng(0).standard_normal((1, 3, 2, 4, 5, 6)).astype(np.float32)
    empty = np.zeros(0, np.float32)
    out = session.run(None, dict(q=packed, k=empty, v=empty))[0]
    want = local_attention_reference(*(torch.from_numpy(packed[:, i]) for i in range(3)),
                                     (3, 3), (1, 1))
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match=r'a packed query must be \(B, 3, N, D, H, W\)'):
        session.run(None, dict(q=packed[:, :2], k=empty, v=empty))
    with pytest.raises(Exception, match='key and value must be empty'):
        session.run(None, dict(q=packed, k=packed[:, 1], v=empty))
    monkeypatch.setenv('SASA_MMDET_ONNXRUNTIME_ISA', 'sse9')
    options = ort.SessionOptions()
    options.register_custom_ops_library(onnxruntime_ops_path())
    with pytest.raises(Exception, match='must be baseline, avx2 or avx512'):
        ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
