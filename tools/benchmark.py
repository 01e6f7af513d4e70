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
swung from 0 to 25 MB for the same convolution.) "Peak MB" is the whole
process's peak resident memory during that pass (torch, the model and its
inputs included). Ratios compare cases measured in the same invocation.

Layer cases: forward + backward of one layer, batch 1, 3x3 convolution
versus attention (window 7, 8 heads) with each implementation ('cpp',
'torch'; 'cpp-recompute': the kernel with ``recompute_attention=True``).
Model cases (``--models``): one training step (loss, backward, SGD step) and
one inference pass of each Table 2 config at ``--image-size``, against the
convolutional baseline trained like the attention models (nothing frozen,
see ``TRAINED_LIKE_ATTENTION``); ``--levers`` adds the attention models
with each memory lever (``with_cp`` or ``recompute_attention`` in every
attention layer).

On a GPU (``--device cuda``) every case runs in one process: time is the
median of ``--repeats`` passes timed with CUDA events after two warm-up
passes (Triton and FlexAttention compile there), memory is
``torch.cuda.max_memory_allocated`` during one pass minus the memory
allocated before it ("extra MB"). Layer cases: forward + backward at the
ResNet-50, FPN and head shapes of a 640x640 image (batch 8) and a 1333x800
image (batch 2), in float32 and in bfloat16 (autocast), beside cuDNN's 3x3
convolution: the Triton kernels ('triton'), the per-offset PyTorch path
('torch') and, where the head width is at least 16, FlexAttention with an
exact SASA mask and a q.r score_mod ('flex'). ``--models`` (needs mmdet and
mmcv's CUDA ops) adds a training step of each Table 2 model.

Examples::

    python tools/benchmark.py                       # quick: two layer shapes
    python tools/benchmark.py --preset resnet50-640 --preset fpn-head-640
    python tools/benchmark.py --models --image-size 640 --repeats 2
    python tools/benchmark.py --no-layers --models --levers  # + memory levers
    python tools/benchmark.py --shapes 64,56,56 128,28,28  # shapes of your own
    python tools/benchmark.py --out work_dirs/benchmark  # JSON + PNG there
    python tools/benchmark.py --device cuda          # GPU: layers, fp32 and bf16
    python tools/benchmark.py --device cuda --models --no-layers
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
    # quick: ResNet-50 stage 1 and an FPN level (P3) of a 640x640 image.
    'quick': [(64, 160, 160), (256, 80, 80)],
    # ResNet-50 conv2 of each stage at its input resolution, 640x640 image.
    'resnet50-640': [(64, 160, 160), (128, 80, 80), (256, 40, 40), (512, 20, 20)],
    'resnet50-1333': [(64, 200, 334), (128, 100, 167), (256, 50, 84), (512, 25, 42)],
    # FPN output convs / head towers: 256 channels on P3..P7.
    'fpn-head-640': [(256, 80, 80), (256, 40, 40), (256, 20, 20), (256, 10, 10), (256, 5, 5)],
    'fpn-head-1333': [(256, 100, 167), (256, 50, 84), (256, 25, 42), (256, 13, 21), (256, 7, 11)],
    # The 640 shapes with the width's divisibility by 16 flipped (W=84
    # beside W=80, ...): Triton specialises ints divisible by 16, so these
    # may run other kernels (tools/analysis_tools/gpu_cost_model.py models
    # both).
    'resnet50-640-wflip': [(64, 160, 164), (128, 80, 84), (256, 40, 48), (512, 20, 32)],
    'fpn-head-640-wflip': [(256, 80, 84), (256, 40, 48), (256, 20, 32), (256, 10, 16),
                           (256, 5, 16)],
}

# GPU layer cases: (batch, preset) as a detector trains them.
CUDA_PRESETS = {'resnet50-640': 8, 'fpn-head-640': 8, 'resnet50-1333': 2, 'fpn-head-1333': 2,
                'resnet50-640-wflip': 8, 'fpn-head-640-wflip': 8}
CUDA_IMPLS = ['triton', 'torch', 'flex']

TABLE2 = [
    ('conv baseline', 'configs/sasa/retinanet_r50_fpn_1x_coco.py'),
    ('attn backbone (conv stem)', 'configs/sasa/retinanet_sasa-r50_fpn_1x_coco.py'),
    ('attn backbone (attn stem)', 'configs/sasa/retinanet_sasa-attnstem-r50_fpn_1x_coco.py'),
    ('attn all (conv stem)', 'configs/sasa/retinanet_sasa-r50_sasa-fpn-head_1x_coco.py'),
    ('attn all (attn stem)', 'configs/sasa/retinanet_sasa-attnstem-r50_sasa-fpn-head_1x_coco.py'),
]


def _every_attention_layer(attention_stem: bool, **options) -> dict:
    """Config options that set ``options`` in every attention layer of a
    Table 2 model (backbone stages, FPN, heads and the attention stem)."""
    parts = ['backbone.attention_cfg', 'neck.attention_cfg', 'bbox_head.attention_cfg']
    if attention_stem:
        parts.append('backbone.stem_cfg.attention_cfg')
    return {f'model.{part}.{key}': value for key, value in options.items() for part in parts}


LEVERS = [
    (f'{name}, {lever}', config,
     _every_attention_layer('attnstem' in config, **{lever: True}))
    for name, config in TABLE2[3:] for lever in ('with_cp', 'recompute_attention')
]

# The attention configs train every layer (no ImageNet attention checkpoint
# exists: frozen_stages=-1, norm_eval=False); mmdet's baseline freezes the
# stem and stage 1 and BatchNorm statistics, so it keeps no activations
# there. The reference trains the baseline like the attention models; the
# baseline as configured is timed too, for information.
TRAINED_LIKE_ATTENTION = {'model.backbone.frozen_stages': -1, 'model.backbone.norm_eval': False}


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
        peak = _peak_rss_mb()
        return dict(extra_mb=max(peak - base, 0.0), peak_mb=peak)
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


def _init_weights_quietly(model) -> None:
    """``model.init_weights()`` without mmengine's log line for each of the
    model's parameters (a few hundred; printing them took two of a model
    case's seconds on CPU, outside what is measured)."""
    import logging

    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


def _run_model_case(case: dict) -> dict:
    import torch
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules

    import sasa_mmdet  # noqa: F401
    register_all_modules()
    cfg = Config.fromfile(osp.join(ROOT, case['config']))
    cfg.merge_from_dict(case.get('cfg_options') or {})
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    _init_weights_quietly(model)
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


def flex_local_attention(query, key, value, window, dilation, rel_row, rel_col):
    """FlexAttention computing exactly the SASA layer's attention: a block
    mask of each pixel's window (raster order over the flattened map) and a
    score_mod adding q.r. Same arguments and result as
    :func:`sasa_mmdet.layers.local_attention` (q.k + q.r, relative tables).
    A peer to measure against, not a backend: it needs head widths of at
    least 16 on GPUs and has no backward on CPU."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    batch, heads, dim, height, width = query.shape
    (kh, kw), (dh, dw) = window, dilation
    top, left = (kh - 1) // 2, (kw - 1) // 2

    def tokens(t):  # (B, N, D, H, W) -> (B, N, H * W, D)
        return t.flatten(3).transpose(2, 3)

    q = tokens(query)
    dim_row = rel_row.shape[-1]
    # q . rel_row[ty] and q . rel_col[tx] for every query: (B, N, H * W, kh | kw)
    row_logits = torch.einsum('bnpd,knd->bnpk', q[..., :dim_row], rel_row.to(q.dtype))
    col_logits = torch.einsum('bnpd,knd->bnpk', q[..., dim_row:], rel_col.to(q.dtype))

    def taps(q_idx, kv_idx):
        dy = kv_idx // width - q_idx // width
        dx = kv_idx % width - q_idx % width
        ty, tx = dy // dh + top, dx // dw + left
        inside = ((dy % dh == 0) & (dx % dw == 0) & (ty >= 0) & (ty < kh) & (tx >= 0)
                  & (tx < kw))
        return ty.clamp(0, kh - 1), tx.clamp(0, kw - 1), inside

    def mask_mod(b, h, q_idx, kv_idx):
        return taps(q_idx, kv_idx)[2]

    def score_mod(score, b, h, q_idx, kv_idx):
        ty, tx, _ = taps(q_idx, kv_idx)
        return score + row_logits[b, h, q_idx, ty] + col_logits[b, h, q_idx, tx]

    length = height * width
    block_mask = create_block_mask(mask_mod, None, None, length, length, device=query.device)
    attend = flex_attention
    if query.device.type == 'cuda':
        attend = _compiled_flex_attention()
    out = attend(q, tokens(key), tokens(value), score_mod=score_mod, block_mask=block_mask,
                 scale=1.0)
    return out.transpose(2, 3).reshape(batch, heads, value.shape[2], height, width)


_COMPILED_FLEX = None


def _compiled_flex_attention():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _flex_layer_class():
    from sasa_mmdet.layers import LocalSelfAttention2d

    class FlexLocalSelfAttention2d(LocalSelfAttention2d):
        """The layer with its attention run by FlexAttention (benchmark peer)."""

        def attend(self, query, key, value, recompute_attention=None):
            return flex_local_attention(query, key, value, self.window_size, self.dilation,
                                        self.rel_row, self.rel_col)

    return FlexLocalSelfAttention2d


def _measure_cuda(step, repeats: int) -> dict:
    """Median time of ``repeats`` passes (CUDA events) after two warm-up
    passes, and the memory one pass allocates beyond what is live before it."""
    import torch
    step()
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return dict(time_s=statistics.median(times), extra_mb=(peak - before) / 2**20,
                peak_mb=peak / 2**20)


def _run_cuda_layer_case(case: dict) -> dict:
    import torch

    from sasa_mmdet.layers import LocalSelfAttention2d
    batch, (channels, height, width) = case['batch'], case['shape']
    op = case['op']
    if op == 'conv3x3':
        layer = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    else:
        impl = op.split(':')[1]
        cls = _flex_layer_class() if impl == 'flex' else LocalSelfAttention2d
        layer = cls(channels, channels, 3, padding=1, window_size=7, num_heads=8,
                    impl='auto' if impl == 'flex' else impl)
    memory_format = getattr(torch, case.get('memory_format', 'contiguous_format'))
    layer = layer.cuda().to(memory_format=memory_format)
    x = torch.randn(batch, channels, height, width, device='cuda')
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    dtype = getattr(torch, case['dtype'])

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x)
        # a gradient in the output's layout, as the next layer would give
        out.backward(torch.ones_like(out))

    return _measure_cuda(step, case['repeats'])


def _cuda_layer_rows(args) -> list:
    """Every layer case beside cuDNN's convolution of the same shape, batch
    and dtype; a case that fails (e.g. out of memory) is reported, not fatal."""
    import torch
    rows = []
    presets = args.preset or [p for p in CUDA_PRESETS if not p.endswith('-wflip')]
    impls = args.impls if args.impls_given else CUDA_IMPLS
    for preset in presets:
        batch = CUDA_PRESETS.get(preset, 1)
        for shape in PRESETS[preset]:
            for dtype in args.dtypes:
                case = dict(kind='layer', batch=batch, shape=shape, dtype=dtype,
                            repeats=args.repeats, memory_format=args.memory_format)
                base = _run_cuda_layer_case(dict(case, op='conv3x3'))
                for impl in impls:
                    label = f'{impl} {dtype} {batch}x{shape}'
                    row = dict(kind='layer', label=label, shape=shape, batch=batch, dtype=dtype,
                               impl=f'{impl} {dtype}', preset=preset,
                               memory_format=args.memory_format,
                               conv_time_s=base['time_s'], conv_extra_mb=base['extra_mb'])
                    if impl == 'flex' and shape[0] // 8 < 16:
                        continue  # FlexAttention needs head widths of at least 16
                    try:
                        row.update(_run_cuda_layer_case(dict(case, op=f'attention:{impl}')))
                    except Exception as error:  # noqa: BLE001  (out of memory, no backward, ...)
                        row['error'] = f'{type(error).__name__}: {error}'.splitlines()[0][:200]
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(f'  {label}: ' + (row['error'] if 'error' in row else
                                            f"{row['time_s'] * 1e3:.2f} ms, conv "
                                            f"{row['conv_time_s'] * 1e3:.2f} ms"), flush=True)
    return rows


def _run_cuda_model_case(case: dict) -> dict:
    import torch
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules

    import sasa_mmdet  # noqa: F401
    register_all_modules()
    cfg = Config.fromfile(osp.join(ROOT, case['config']))
    cfg.merge_from_dict(case.get('cfg_options') or {})
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).cuda()
    _init_weights_quietly(model)
    size, batch = case['image_size'], case['batch']
    packed = demo_mm_inputs(batch, [[3, size, size]] * batch, num_items=[5] * batch)
    data = model.data_preprocessor(packed, training=True)
    data = dict(inputs=data['inputs'].cuda(),
                data_samples=[sample.cuda() for sample in data['data_samples']])
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=1e-4)
    dtype = getattr(torch, case['dtype'])

    def step():
        optim.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            losses = model(**data, mode='loss')
        sum(v.sum() if not isinstance(v, list) else sum(v) for v in losses.values()).backward()
        optim.step()

    return _measure_cuda(step, case['repeats'])


def _cuda_model_rows(args, models) -> list:
    rows = []
    for dtype in args.dtypes:
        base = None
        for name, config, options, _ in models:
            case = dict(config=config, cfg_options=options, image_size=args.image_size,
                        batch=args.batch, dtype=dtype, repeats=args.repeats)
            result = _run_cuda_model_case(case)
            base = base or result
            rows.append(dict(kind='model', label=f'train {dtype} {name}', config=config,
                             mode='train', impl=dtype, dtype=dtype, cfg_options=options,
                             conv_time_s=base['time_s'], conv_extra_mb=base['extra_mb'],
                             conv_peak_mb=base['peak_mb'], **result))
            print(f"  {rows[-1]['label']}: {result['time_s'] * 1e3:.1f} ms", flush=True)
    return rows


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
    """Time, extra-memory and (models) peak-memory ratios to the
    convolution, one horizontal bar per case, grouped by shape (layers) or
    Table 2 config (models), one colour per implementation."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    panels = [('time_ratio', 'time / convolution'),
              ('memory_ratio', 'extra memory / convolution')]
    if any('peak_ratio' in r for r in rows):
        panels.append(('peak_ratio', 'peak memory / conv baseline'))
    series = list(dict.fromkeys(r.get('impl', 'model') for r in rows))
    groups = list(dict.fromkeys(_group(r) for r in rows))
    bar = 0.8 / len(series)
    fig, axes = plt.subplots(1, len(panels), sharey=True,
                             figsize=(6 * len(panels), 1.5 + 0.22 * len(groups) * len(series)))
    for ax, (key, title) in zip(axes, panels):
        for i, name in enumerate(series):
            mine = [r for r in rows if r.get('impl', 'model') == name and key in r]
            ax.barh([groups.index(_group(r)) + (i - (len(series) - 1) / 2) * bar
                     for r in mine], [r[key] for r in mine], height=bar, label=name)
        ax.axvline(1.0, color='k', lw=0.8)
        ax.set_xscale('log')
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis='x', labelsize=7)
        ax.set_title(title)
        ax.grid(axis='x', which='both', alpha=0.3)
    axes[0].set_yticks(range(len(groups)))
    axes[0].set_yticklabels(groups, fontsize=8)
    axes[0].invert_yaxis()
    if len(series) > 1:
        axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _group(row) -> str:
    if row['kind'] == 'layer':
        return 'C={}, {}x{}'.format(*row['shape'])
    return row['label']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', action='append', choices=sorted(PRESETS),
                        help='layer shape presets (default: quick)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu',
                        help='cpu (default) or cuda (see the module docstring)')
    parser.add_argument('--impls', nargs='+',
                        help="attention implementations to time (CPU default: cpp "
                        "cpp-recompute torch, '-recompute' meaning recompute_attention=True; "
                        'CUDA default: triton torch flex)')
    parser.add_argument('--dtypes', nargs='+', choices=['float32', 'bfloat16', 'float16'],
                        default=['float32', 'bfloat16'],
                        help='CUDA only: dtypes (bfloat16/float16 under autocast)')
    parser.add_argument('--batch', type=int, default=8,
                        help='CUDA only: images per training step of the models (default 8)')
    parser.add_argument('--shapes', nargs='+', metavar='C,H,W',
                        help='layer shapes of your own (instead of the presets)')
    parser.add_argument('--models', action='store_true', help='also time the Table 2 models')
    parser.add_argument('--configs', nargs='+', metavar='CONFIG',
                        help='the Table 2 configs to time (default: all; the '
                        'convolutional baseline always runs, as the reference)')
    parser.add_argument('--levers', action='store_true',
                        help='also time the attention models with each memory lever '
                        '(implies --models)')
    parser.add_argument('--no-layers', action='store_true', help='skip the layer cases')
    parser.add_argument('--memory-format', choices=['contiguous_format', 'channels_last'],
                        default='contiguous_format',
                        help='--device cuda: the layers\' input and the convolution\'s '
                             'weights in this memory format (channels_last: the Triton '
                             'kernels\' vector loads, cuDNN\'s NHWC kernels)')
    parser.add_argument('--image-size', type=int, default=640)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads in each case (default: torch decides)')
    parser.add_argument('--out', default='work_dirs/benchmark',
                        help='folder for benchmark.json and benchmark.png')
    parser.add_argument('--plot', metavar='JSON',
                        help='only draw benchmark.png (beside it) from a benchmark.json')
    parser.add_argument('--case', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.plot:
        with open(args.plot) as f:
            rows = json.load(f)['rows']
        _plot(rows, osp.join(osp.dirname(args.plot), 'benchmark.png'))
        print(f'wrote {osp.join(osp.dirname(args.plot), "benchmark.png")}')
        return

    if args.case:  # child process
        case = json.loads(args.case)
        if case.get('threads'):
            import torch
            torch.set_num_threads(case['threads'])
        run = _run_layer_case if case['kind'] == 'layer' else _run_model_case
        print(json.dumps(run(case)))
        return

    args.impls_given = args.impls is not None
    if args.impls is None:
        args.impls = CUDA_IMPLS if args.device == 'cuda' else ['cpp', 'cpp-recompute', 'torch']
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            parser.error('--device cuda: torch sees no CUDA device on this machine')
        if args.shapes:
            parser.error('--device cuda measures the presets (--preset); --shapes is CPU only')
    elif args.dtypes != ['float32', 'bfloat16']:
        parser.error('--dtypes is CUDA only (the CPU benchmark runs float32)')
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.split(',')) for s in args.shapes]
            if any(len(s) != 3 or min(s) <= 0 for s in shapes):
                raise ValueError
        except ValueError:
            parser.error(f'--shapes takes C,H,W triples of positive ints, got {args.shapes}')
        if args.preset:
            parser.error('--shapes and --preset exclude each other')
    else:
        shapes = [s for p in (args.preset or ['quick']) for s in PRESETS[p]]
    known = [config for _, config in TABLE2]
    unknown = [c for c in args.configs or [] if c not in known]
    if unknown:
        parser.error(f'--configs: {unknown} not among the Table 2 configs {known}')
    models = [('conv baseline, nothing frozen (reference)', known[0], TRAINED_LIKE_ATTENTION,
               False),
              ('conv baseline as configured (stem, stage 1 frozen)', known[0], {}, True)]
    models += [(name, config, {}, False) for name, config in TABLE2[1:]
               if not args.configs or config in args.configs]
    if args.levers:
        args.models = True
        models += [(*lever, True) for lever in LEVERS
                   if not args.configs or lever[1] in args.configs]

    rows = []
    if args.device == 'cuda':
        if not args.no_layers:
            rows += _cuda_layer_rows(args)
        if args.models:
            rows += _cuda_model_rows(args, [m for m in models if not m[3] or m[2]])
    elif not args.no_layers:
        for shape in dict.fromkeys(shapes):
            base = _run_child(dict(kind='layer', op='conv3x3', shape=shape,
                                   repeats=args.repeats, threads=args.threads))
            for impl in args.impls:
                result = _run_child(dict(kind='layer', op=f'attention:{impl}', shape=shape,
                                         repeats=args.repeats, threads=args.threads))
                rows.append(dict(kind='layer', label=f'{impl} {shape}', shape=shape, impl=impl,
                                 conv_time_s=base['time_s'], conv_extra_mb=base['extra_mb'],
                                 **result))
    if args.models and args.device == 'cpu':
        for mode in ('train', 'infer'):
            base = None
            for name, config, options, train_only in models:
                if train_only and mode == 'infer':
                    continue  # freezing and the levers act on training only
                result = _run_child(dict(kind='model', config=config, mode=mode,
                                         cfg_options=options, image_size=args.image_size,
                                         repeats=args.repeats, threads=args.threads))
                base = base or result
                rows.append(dict(kind='model', label=f'{mode} {name}', config=config, mode=mode,
                                 cfg_options=options, conv_time_s=base['time_s'],
                                 conv_extra_mb=base['extra_mb'],
                                 conv_peak_mb=base['peak_mb'], **result))
    for r in rows:
        if 'error' in r:
            continue
        r['time_ratio'] = r['time_s'] / r['conv_time_s']
        r['memory_ratio'] = r['extra_mb'] / max(r['conv_extra_mb'], 1.0)
        if r['kind'] == 'model':
            r['peak_ratio'] = r['peak_mb'] / r['conv_peak_mb']

    header = f"{'case':<52} {'time s':>8} {'conv s':>8} {'x time':>7} " \
             f"{'extra MB':>9} {'conv MB':>8} {'x mem':>6} {'peak MB':>8} {'x peak':>7}"
    print(header)
    print('-' * len(header))
    for r in rows:
        if 'error' in r:
            print(f"{r['label']:<52} failed: {r['error']}")
            continue
        peak = (f" {r['peak_mb']:>8.0f} {r['peak_ratio']:>7.2f}"
                if r['kind'] == 'model' else '')
        print(f"{r['label']:<52} {r['time_s']:>8.3f} {r['conv_time_s']:>8.3f} "
              f"{r['time_ratio']:>7.2f} {r['extra_mb']:>9.0f} {r['conv_extra_mb']:>8.0f} "
              f"{r['memory_ratio']:>6.2f}{peak}")
    os.makedirs(args.out, exist_ok=True)
    import torch
    meta = dict(torch=torch.__version__, device=args.device,
                threads=args.threads or torch.get_num_threads(), cpus=os.cpu_count(),
                repeats=args.repeats, image_size=args.image_size)
    if args.device == 'cuda':
        import triton
        meta.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                    cuda=torch.version.cuda, batch=args.batch)
    with open(osp.join(args.out, 'benchmark.json'), 'w') as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    if any('time_ratio' in r for r in rows):
        try:
            _plot(rows, osp.join(args.out, 'benchmark.png'))
        except ImportError:  # a bare GPU machine: draw it later with --plot
            print('matplotlib is not installed: no benchmark.png (draw it elsewhere with '
                  f'`python tools/benchmark.py --plot {osp.join(args.out, "benchmark.json")}`)')
    print(f'wrote {osp.join(args.out, "benchmark.json")} and benchmark.png')


if __name__ == '__main__':
    main()
