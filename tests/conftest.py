import atexit
import os
import shutil
import tempfile

import pytest

# torch.compile's on-disk cache is shared by every process of the machine
# and keys graphs without the compiled CPU kernel's build: a graph cached
# by another checkout could come back. Each test session compiles afresh.
os.environ['TORCHINDUCTOR_CACHE_DIR'] = tempfile.mkdtemp(prefix='sasa_mmdet_inductor_')
atexit.register(shutil.rmtree, os.environ['TORCHINDUCTOR_CACHE_DIR'], ignore_errors=True)

# Triton's interpreter runs the Triton kernels on CPU tensors (impl='triton'
# in the tests); it has to be on before the kernels are defined.
if 'TRITON_INTERPRET' not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ['TRITON_INTERPRET'] = '1'


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: end-to-end runs (seconds to minutes); still run in CI')


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Every test starts from the same random state of torch, NumPy and
    Python, whatever ran before it: no outcome depends on the test order or
    on chance (tests that need their own seeds still set them)."""
    import random

    import numpy as np
    import torch
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def mmdet_default_scope():
    """Every test starts in MMDetection's registry scope, whatever scope an
    earlier test's Runner left current (as mmdet's own tests do). Without
    mmdet or mmcv's ops (tools/gpu_check.sh on a bare GPU machine, a fresh
    pip install) only the layer tests run, and need no scope."""
    import sasa_mmdet
    if 'SASAResNet' in sasa_mmdet.__all__:  # mmdet and mmcv with its ops
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=True)


class _RecordingKernel:
    """Stands in for the compiled attention kernel and records the dtype of
    its inputs: it computes logits and softmax in that dtype."""

    def __init__(self, kernel, dtypes) -> None:
        self.kernel = kernel
        self.dtypes = dtypes

    def forward(self, query, *args):
        self.dtypes.append(('kernel', query.dtype))
        return self.kernel.forward(query, *args)

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@pytest.fixture
def softmax_dtypes(monkeypatch):
    """The dtype of every attention softmax computed while the test runs.

    Yields a list that gets ``('kernel', dtype)`` for each forward call of
    the compiled CPU kernel and ``('torch', dtype)`` for each softmax run by
    PyTorch (the attention's 'torch' and 'reference' paths, the attention
    stem's mixture weights; the dtype the softmax computes in, after its
    ``dtype`` argument).
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    from sasa_mmdet.layers.backends import cpu, pytorch

    dtypes = []
    softmax_functions = (torch.softmax, torch.Tensor.softmax, F.softmax,
                         torch.special.softmax)

    class RecordSoftmax(TorchFunctionMode):

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in softmax_functions:
                dtype = kwargs.get('dtype') or next(
                    (a for a in args if isinstance(a, torch.dtype)),
                    args[0].dtype)
                dtypes.append(('torch', dtype))
            return func(*args, **kwargs)

    # The 'torch' backend runs inside the registered operator, below the
    # reach of torch-function modes: record its softmax where it is made.
    attention_map = pytorch.attention_map

    def recording_attention_map(*args):
        attn = attention_map(*args)
        dtypes.append(('torch', attn.dtype))
        return attn

    monkeypatch.setattr(pytorch, 'attention_map', recording_attention_map)
    kernel = cpu.cpu_kernel()
    if kernel is not None:
        monkeypatch.setattr(cpu, '_KERNEL',
                            _RecordingKernel(kernel, dtypes))
    with RecordSoftmax():
        yield dtypes
