import pytest


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: end-to-end runs (seconds to minutes); still run in CI')


@pytest.fixture(autouse=True)
def mmdet_default_scope():
    """Every test starts in MMDetection's registry scope, whatever scope an
    earlier test's Runner left current (as mmdet's own tests do)."""
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import sasa_mmdet  # noqa: F401


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

    from sasa_mmdet.layers import local_attention_ops

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

    kernel = local_attention_ops.cpu_kernel()
    if kernel is not None:
        monkeypatch.setattr(local_attention_ops, '_CPU_KERNEL',
                            _RecordingKernel(kernel, dtypes))
    with RecordSoftmax():
        yield dtypes
