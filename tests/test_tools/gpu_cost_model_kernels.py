"""A tiny Triton kernel for tests/test_tools/test_gpu_cost_model.py.

Run as a script (``python gpu_cost_model_kernels.py N``) it compiles the
kernel for sm_90 as a launch with ``n = N`` would be specialised and
prints gpu_cost_model's analysis of its SASS as JSON: compiling needs
TRITON_INTERPRET unset, which the test session sets.
"""
import json
import os.path as osp
import sys

import triton.language as tl


def looped_sum(X, OUT, n, W, BLOCK: tl.constexpr):
    """Sums n rows of BLOCK values: a runtime loop of n trips."""
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(n):
        acc += tl.load(X + i * W + offsets, mask=offsets < W, other=0.0).to(tl.float32)
    tl.store(OUT + tl.program_id(0) * BLOCK + offsets, acc)


def main(trips: int) -> dict:
    import torch
    from triton.runtime.jit import JITFunction
    sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..', '..', 'tools',
                                'analysis_tools'))
    import gpu_cost_model as model
    kernel = JITFunction(looped_sum)
    recorder = model.LaunchRecorder(backend_module=object())
    with recorder.active('forward'):
        kernel[(3, )](torch.zeros(64, 48, dtype=torch.bfloat16), torch.zeros(3, 16), trips, 48,
                      BLOCK=16)
    spec = model.specialise_launch(recorder.launches[0], 90)
    compiled = model.compile_variant(kernel, 90, spec)
    if 'error' in compiled:
        return dict(error=compiled['error'])
    stats = model.analyse_sass(compiled['sass'], compiled['ttgir'], dict(n=trips, W=48),
                               (3, 1, 1))
    return dict(stats, registers=compiled['registers'], stack_bytes=compiled['stack_bytes'])


if __name__ == '__main__':
    print(json.dumps(main(int(sys.argv[1]))))
