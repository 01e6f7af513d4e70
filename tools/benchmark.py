"""Time and memory of local attention beside the convolution it replaces.

Every case runs in fresh subprocesses. Time is the median of ``--repeats``
passes after one warm-up pass. "Extra MB" is measured in a second
subprocess: the peak resident memory during one pass minus the resident
memory just before it (module and inputs built, one warm-up pass done),
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``)
so that every freed tensor leaves the resident set: it then counts the
memory the pass holds at its peak. (With glibc's default sliding
threshold, freed blocks of up to 32 MiB stay resident in the heap, and how
many happen to be reused depends on the order of allocations: that figure
swung from 0 to 25 MB for the same convolution.) Ratios compare cases
measured in the same invocation.

Layer cases: forward + backward of one layer, batch 1, 3x3 convolution
versus attention (window 7, 8 heads) with each implementation ('cpp',
'torch'; 'cpp-recompute': the kernel with ``recompute_attention=True``).
Model cases (``--models``): one training step (loss, backward, SGD step) and
one inference pass of each Table 2 config at ``--image-size``.

Examples::

    python tools/benchmark.py                       # the issue's layer shapes
    python tools/benchmark.py --preset resnet50-640 --preset fpn-head-640
    python tools/benchmark.py --models --image-size 640 --repeats 2
    python tools/benchmark.py --out work_dirs/benchmark  # JSON + PNG there
"""
import argparse
import json
import os
import os.path as osp
import re
import statistics
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

# (channels, height, width) of the spatial convolutions the attention replaces.
PRESETS = {
    'issue': [(64, 160, 160), (256, 80, 80)],
    # ResNet-50 conv2 of each stage at its input resolution, 640x640 image.
    'resnet50-640': [(64, 160, 160), (128, 80, 80), (256, 40, 40), (512, 20, 20)],
    'resnet50-1333': [(64, 200, 334), (128, 100, 167), (256, 50, 84), (512, 25, 42)],
    # FPN output convs / head towers: 256 channels on P3..P7.
    'fpn-head-640': [(256, 80, 80), (256, 40, 40), (256, 20, 20), (256, 10, 10), (256, 5, 5)],
    'fpn-head-1333': [(256, 100, 167), (256, 50, 84), (256, 25, 42), (256, 13, 21), (256, 7, 11)],
}

TABLE2 = [
    ('conv baseline', 'configs/retinanet_r50_fpn_conv-baseline.py'),
    ('attn backbone (conv stem)', 'configs/retinanet_sasa_r50_fpn.py'),
    ('attn backbone (attn stem)', 'configs/retinanet_sasa-attnstem_r50_fpn.py'),
    ('attn all (conv stem)', 'configs/retinanet_sasa_r50_sasa-fpn_sasa-head.py'),
    ('attn all (attn stem)', 'configs/retinanet_sasa-attnstem_r50_sasa-fpn_sasa-head.py'),
]


def _rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _peak_rss_mb() -> float:
    with open('/proc/self/status') as f:
        return int(re.search(r'VmHWM:\s+(\d+)', f.read()).group(1)) / 1024


def _measure(step, repeats: int, memory: bool) -> dict:
    step()  # warm-up (allocator, kernel selection, thread pools)
    if memory:
        base = _rss_mb()
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # restart the peak (VmHWM) from the current RSS
        step()
        return dict(extra_mb=max(_peak_rss_mb() - base, 0.0))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(time_s=statistics.median(times))


def _run_layer_case(case: dict) -> dict:
    import torch

    from sasa_mmdet.layers import LocalSelfAttention2d
    channels, height, width = case['shape']
    if case['op'] == 'conv3x3':
        layer = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    else:
        impl, _, option = case['op'].split(':')[1].partition('-')
        layer = LocalSelfAttention2d(channels, channels, 3, padding=1, window_size=7,
                                     num_heads=8, impl=impl,
                                     recompute_attention=option == 'recompute')
    x = torch.randn(1, channels, height, width, requires_grad=True)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()

    return _measure(step, case['repeats'], case['memory'])


def _run_model_case(case: dict) -> dict:
    import torch
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules

    import sasa_mmdet  # noqa: F401
    register_all_modules()
    cfg = Config.fromfile(osp.join(ROOT, case['config']))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    size = case['image_size']
    packed = demo_mm_inputs(1, [[3, size, size]], num_items=[5])
    data = model.data_preprocessor(packed, training=case['mode'] == 'train')
    if case['mode'] == 'train':
        model.train()
        optim = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            optim.zero_grad(set_to_none=True)
            losses = model(**data, mode='loss')
            sum(v.sum() if not isinstance(v, list) else sum(v)
                for v in losses.values()).backward()
            optim.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(data['inputs'], mode='tensor')

    return _measure(step, case['repeats'], case['memory'])


def _run_child(case: dict) -> dict:
    """Time in one subprocess, memory in another (see the module docstring)."""
    result = {}
    for memory in (False, True):
        env = dict(os.environ, PYTHONWARNINGS='ignore')
        if memory:
            env['MALLOC_MMAP_THRESHOLD_'] = str(64 * 1024)
        proc = subprocess.run(
            [sys.executable, __file__, '--case', json.dumps(dict(case, memory=memory))],
            capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f'benchmark case {case} failed:\n{proc.stderr[-3000:]}')
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


def _plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = [r['label'] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 0.9), 4.5))
    for ax, key, title in ((axes[0], 'time_ratio', 'time / convolution'),
                           (axes[1], 'memory_ratio', 'extra memory / convolution')):
        values = [r[key] for r in rows]
        ax.bar(range(len(rows)), values, color=['tab:blue' if v <= 1 else 'tab:orange'
                                                  for v in values])
        ax.axhline(1.0, color='k', lw=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha='right', fontsize=7)
        ax.set_title(title)
        ax.set_yscale('log')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', action='append', choices=sorted(PRESETS),
                        help='layer shape presets (default: issue)')
    parser.add_argument('--impls', nargs='+', default=['cpp', 'cpp-recompute', 'torch'],
                        help="attention implementations to time; '-recompute' appended "
                        'means recompute_attention=True')
    parser.add_argument('--models', action='store_true', help='also time the Table 2 models')
    parser.add_argument('--no-layers', action='store_true', help='skip the layer cases')
    parser.add_argument('--image-size', type=int, default=640)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads in each case (default: torch decides)')
    parser.add_argument('--out', default='work_dirs/benchmark',
                        help='folder for benchmark.json and benchmark.png')
    parser.add_argument('--case', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:  # child process
        case = json.loads(args.case)
        if case.get('threads'):
            import torch
            torch.set_num_threads(case['threads'])
        run = _run_layer_case if case['kind'] == 'layer' else _run_model_case
        print(json.dumps(run(case)))
        return

    rows = []
    if not args.no_layers:
        for shape in dict.fromkeys(s for p in (args.preset or ['issue']) for s in PRESETS[p]):
            base = _run_child(dict(kind='layer', op='conv3x3', shape=shape,
                                   repeats=args.repeats, threads=args.threads))
            for impl in args.impls:
                result = _run_child(dict(kind='layer', op=f'attention:{impl}', shape=shape,
                                         repeats=args.repeats, threads=args.threads))
                rows.append(dict(kind='layer', label=f'{impl} {shape}', shape=shape, impl=impl,
                                 conv_time_s=base['time_s'], conv_extra_mb=base['extra_mb'],
                                 **result))
    if args.models:
        for mode in ('train', 'infer'):
            base = None
            for name, config in TABLE2:
                result = _run_child(dict(kind='model', config=config, mode=mode,
                                         image_size=args.image_size, repeats=args.repeats,
                                         threads=args.threads))
                base = base or result
                rows.append(dict(kind='model', label=f'{mode} {name}', config=config, mode=mode,
                                 conv_time_s=base['time_s'], conv_extra_mb=base['extra_mb'],
                                 **result))
    for r in rows:
        r['time_ratio'] = r['time_s'] / r['conv_time_s']
        r['memory_ratio'] = r['extra_mb'] / max(r['conv_extra_mb'], 1.0)

    header = f"{'case':<44} {'time s':>8} {'conv s':>8} {'x time':>7} " \
             f"{'extra MB':>9} {'conv MB':>8} {'x mem':>6}"
    print(header)
    print('-' * len(header))
    for r in rows:
        print(f"{r['label']:<44} {r['time_s']:>8.3f} {r['conv_time_s']:>8.3f} "
              f"{r['time_ratio']:>7.2f} {r['extra_mb']:>9.0f} {r['conv_extra_mb']:>8.0f} "
              f"{r['memory_ratio']:>6.2f}")
    os.makedirs(args.out, exist_ok=True)
    import torch
    meta = dict(torch=torch.__version__, threads=args.threads or torch.get_num_threads(),
                cpus=os.cpu_count(), repeats=args.repeats, image_size=args.image_size)
    with open(osp.join(args.out, 'benchmark.json'), 'w') as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    if rows:
        _plot(rows, osp.join(args.out, 'benchmark.png'))
    print(f'wrote {osp.join(args.out, "benchmark.json")} and benchmark.png')


if __name__ == '__main__':
    main()
