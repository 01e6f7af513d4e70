"""The attention layers' multiply-adds in mmengine's FLOP counter.

mmengine's ``get_model_complexity_info`` (and so MMDetection's
``tools/analysis_tools/get_flops.py``) counts FLOPs with
:class:`mmengine.analysis.FlopAnalyzer`: it traces the model with
``torch.jit`` and adds up per-operator handles (``aten::_convolution``,
``aten::bmm``, ``aten::einsum``, ...). Inside an attention layer it sees the
projections' ``bmm`` but not the attention itself (the window products run
in a registered operator or an autograd Function that it has no handle for),
so it reported 75.3M FLOPs for the demo attention RetinaNet where the layer
does 89.0M multiply-adds.

Mechanism: a module-level handle. Every module that exposes
``multiply_adds(input_shape)`` (``LocalSelfAttention2d``,
``SpatiallyAwareAttention2d``, ``AttentionStem``) is counted by that method,
once per call during the trace, as one operator named after its class; the
operators traced inside it are dropped from its count and from its
ancestors'. This keeps a single definition of the attention's cost, the one
``tools/analysis_tools/get_flops.py`` and the README use, whichever
backend runs the attention (compiled CPU kernel, Triton, PyTorch, the ONNX
path) and however it is written; an operator-level handle would have to
reconstruct the formula from each backend's traced arguments, and the ops
around the registered operator (projections, q.r einsum) would be counted by
mmengine's own, differently defined handles.

:func:`register_mmengine_flop_counting` installs it (``import sasa_mmdet``
calls it; idempotent). mmengine calls one multiply-add a "flop"; it also
counts norms, upsampling and adaptive pooling, which the paper's
convention (and our tool) leaves out, so its figure for a detector is a
little (about 1%) above our multiply-adds.
"""
import functools
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import torch.nn as nn

_MARK = '_sasa_mmdet_module_handles'


def _has_multiply_adds(module: nn.Module) -> bool:
    return callable(getattr(module, 'multiply_adds', None))


def modules_with_multiply_adds(analyzer) -> Tuple[List[str], List[Tuple[str, nn.Module]]]:
    """The modules an analyzer counts by their ``multiply_adds``.

    Args:
        analyzer: a :class:`mmengine.analysis.JitModelAnalysis`.

    Returns:
        tuple: the canonical names of the outermost ones (the leaves whose
        traced operators are replaced), and ``(canonical name, module)`` for
        all of them, nested ones included (a stem's attention).
    """
    named = {}
    for module, name in ((m, n) for n, m in analyzer._model.named_modules()):
        if _has_multiply_adds(module):
            named.setdefault(analyzer._aliases[module], module)
    names = sorted(named)
    leaves = [name for name in names
              if not any(name != other and (other == '' or name.startswith(other + '.'))
                         for other in names)]
    return leaves, list(named.items())


def _subtract(counter: Counter, amounts: Counter) -> None:
    for key, value in amounts.items():
        counter[key] -= value
        if counter[key] == 0:
            del counter[key]


def _analyze_with_module_handles(analyzer, analyze):
    """``analyze(analyzer)`` (mmengine's ``_analyze``), with every module
    that has ``multiply_adds`` counted by it."""
    leaves, counted = modules_with_multiply_adds(analyzer)
    if not leaves:
        return analyze(analyzer)
    calls: Dict[str, int] = defaultdict(int)

    def make_hook(name):

        def hook(module, inputs):
            calls[name] += int(module.multiply_adds(tuple(inputs[0].shape)))

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name))
               for name, module in counted]
    warn = analyzer._enable_warn_unsupported_ops
    analyzer._enable_warn_unsupported_ops = False  # warned below, corrected
    try:
        stats = analyze(analyzer)
    finally:
        analyzer._enable_warn_unsupported_ops = warn
        for handle in handles:
            handle.remove()

    kinds = {name: type(module).__name__ for name, module in counted}
    for leaf in leaves:
        traced = Counter(stats.counts[leaf])
        unsupported = Counter(stats.unsupported_ops[leaf])
        own = Counter({kinds[leaf]: calls[leaf]}) if calls[leaf] else Counter()
        for ancestor in analyzer._get_all_ancestors(leaf) - {leaf}:
            _subtract(stats.counts[ancestor], traced)
            stats.counts[ancestor].update(own)
            _subtract(stats.unsupported_ops[ancestor], unsupported)
        # Inside the leaf, only the module handles count.
        for name in stats.counts:
            if name == leaf or leaf == '' or name.startswith(leaf + '.'):
                stats.counts[name] = (Counter({kinds[name]: calls[name]})
                                      if calls.get(name) else Counter())
                stats.unsupported_ops[name] = Counter()
    analyzer._warn_unsupported_ops(stats.unsupported_ops[''])
    return stats


def register_mmengine_flop_counting() -> bool:
    """Make mmengine's ``FlopAnalyzer`` count modules by ``multiply_adds``.

    Installs the module-level handle described in the module docstring on
    :class:`mmengine.analysis.FlopAnalyzer` (``ActivationAnalyzer`` is left
    as it is). Calling it again changes nothing.

    Returns:
        bool: True if it was installed by this call.

    Example:
        >>> from mmengine.analysis import get_model_complexity_info
        >>> from sasa_mmdet import LocalSelfAttention2d
        >>> register_mmengine_flop_counting()
        False
        >>> layer = LocalSelfAttention2d(8, 8, 3, num_heads=2)
        >>> info = get_model_complexity_info(layer, (8, 5, 5),
        ...                                  show_table=False, show_arch=False)
        >>> info['flops'] == layer.multiply_adds((1, 8, 5, 5))
        True
    """
    from mmengine.analysis.complexity_analysis import FlopAnalyzer

    if getattr(FlopAnalyzer._analyze, _MARK, False):
        return False
    analyze = FlopAnalyzer._analyze

    @functools.wraps(analyze)
    def _analyze(self):
        if self._stats is not None:
            return self._stats
        return _analyze_with_module_handles(self, analyze)

    setattr(_analyze, _MARK, True)
    FlopAnalyzer._analyze = _analyze
    return True


__all__ = ['modules_with_multiply_adds', 'register_mmengine_flop_counting']
