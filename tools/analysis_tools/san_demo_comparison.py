"""The demo detector with four backbones, trained side by side.

The bundled demo (configs/demo/retinanet_r-tiny_shapes.py: RetinaNet, FPN
and head of 32 channels, the synthetic shapes data, AdamW, batch 8) with

- its convolutional backbone (quarter-width ResNet-18),
- SASA's (configs/demo/retinanet_sasa-tiny_shapes.py),
- SAN pairwise and patchwise (configs/san/retinanet_san-tiny-*_shapes.py),

each trained from scratch with ``tools/train.py`` on the same data and
schedule, one after the other, and evaluated at the end of training (COCO
bbox mAP on the held-out split). It prints a markdown table and writes
JSON: mAP, parameters and multiply-adds (backbone and whole detector, one
160x160 image, :func:`sasa_mmdet.utils.get_model_complexity`), the mean
training-step time (batch 8, data loading included, from the training
log) and the training process's peak resident memory.

Usage (the dataset is written first if missing)::

    python tools/analysis_tools/san_demo_comparison.py [--epochs 36] \
        [--work-dir work_dirs/san_demo_comparison] [--only NAME ...]
    # training-step times of the four, back to back in one process
    python tools/analysis_tools/san_demo_comparison.py --step-times 5
"""
import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)  # this checkout's sasa_mmdet, whatever is installed
MODELS = {
    'conv (ResNet-18/4)': 'configs/demo/retinanet_r-tiny_shapes.py',
    'SASA': 'configs/demo/retinanet_sasa-tiny_shapes.py',
    'SAN pairwise': 'configs/san/retinanet_san-tiny-pairwise_shapes.py',
    'SAN patchwise': 'configs/san/retinanet_san-tiny-patchwise_shapes.py',
}


def complexity(config: str) -> dict:
    from mmengine.config import Config

    from sasa_mmdet.utils import build_model_from_cfg, get_model_complexity

    info = get_model_complexity(build_model_from_cfg(Config.fromfile(config)), (160, 160))
    parts = {c['name']: c for c in info['components']}
    return dict(params=parts['total']['params'], backbone_params=parts['backbone']['params'],
                multiply_adds=parts['total']['multiply_adds'],
                backbone_multiply_adds=parts['backbone']['multiply_adds'])


def step_times(configs: dict, steps: int = 5, images: int = 8, size: int = 160) -> dict:
    """Mean training-step time of each detector, back to back in this
    process on one synthetic batch (``images`` images of ``size`` x ``size``,
    by default the demo's 8 of 160x160, 3 boxes each): the same machine
    state for all, unlike the training logs' times."""
    import torch
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.testing import demo_mm_inputs
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    import sasa_mmdet  # noqa: F401

    init_default_scope('mmdet')
    torch.manual_seed(0)
    data = demo_mm_inputs(images, [[3, size, size]] * images, num_items=[3] * images,
                          num_classes=3)
    times = {}
    for name, config in configs.items():
        cfg = Config.fromfile(config)
        model = DET_MODELS.build(cfg.model)
        model.init_weights()
        model.train()
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        model.train_step(data, optim_wrapper)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            model.train_step(data, optim_wrapper)
        times[name] = (time.perf_counter() - start) / steps
    return times


def train(config: str, work_dir: str, epochs) -> dict:
    command = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir',
               work_dir]
    if epochs is not None:
        command += ['--cfg-options', f'train_cfg.max_epochs={epochs}',
                    f'train_cfg.val_interval={epochs}', f'param_scheduler.1.end={epochs}',
                    f'default_hooks.checkpoint.interval={epochs}']
    start = time.time()
    # this checkout's sasa_mmdet, whatever is installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    with open(work_dir + '.log', 'w') as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=env)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f'training {config} failed (status {status}); see {work_dir}')
    scalars = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))[-1]
    records = [json.loads(line) for line in open(scalars)]
    steps = [r['time'] for r in records if 'time' in r and 'loss' in r]
    final = [r for r in records if 'coco/bbox_mAP' in r][-1]
    return dict(mAP=final['coco/bbox_mAP'], mAP_50=final['coco/bbox_mAP_50'],
                step_time_s=sum(steps[1:]) / max(len(steps) - 1, 1),
                peak_rss_mib=usage.ru_maxrss / 1024, wall_s=time.time() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=None,
                        help="training epochs (default: the demo's 36)")
    parser.add_argument('--work-dir', default='work_dirs/san_demo_comparison')
    parser.add_argument('--only', nargs='+', choices=list(MODELS), help='a subset of models')
    parser.add_argument('--step-times', type=int, default=0, metavar='STEPS',
                        help='instead of training, time STEPS training steps of each model '
                        'back to back in one process')
    args = parser.parse_args(argv)
    if args.step_times:
        configs = {n: c for n, c in MODELS.items() if not args.only or n in args.only}
        times = step_times(configs, args.step_times)
        print(json.dumps(times))
        return times
    data_root = os.environ.setdefault('SASA_DEMO_DATA_ROOT', 'data/sasa_demo')
    if not osp.exists(osp.join(ROOT, data_root, 'annotations', 'val.json')):
        subprocess.run([sys.executable, 'tools/misc/make_demo_dataset.py', '--out', data_root],
                       cwd=ROOT, check=True)
    rows = []
    for name, config in MODELS.items():
        if args.only and name not in args.only:
            continue
        work_dir = osp.join(args.work_dir, osp.basename(config)[:-3])
        os.makedirs(work_dir, exist_ok=True)
        row = dict(model=name, config=config, epochs=args.epochs or 36, **complexity(config))
        row.update(train(config, work_dir, args.epochs))
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(osp.join(args.work_dir, 'comparison.json'), 'w') as f:
            json.dump(rows, f, indent=1)
    print('| backbone | bbox mAP | AP50 | params (M) | backbone params (M) | '
          'mult-adds (G) | backbone mult-adds (G) | step (s) | peak RSS (MiB) |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["model"]} | {r["mAP"]:.3f} | {r["mAP_50"]:.3f} | {r["params"] / 1e6:.3f} '
              f'| {r["backbone_params"] / 1e6:.3f} | {r["multiply_adds"] / 1e9:.3f} | '
              f'{r["backbone_multiply_adds"] / 1e9:.3f} | {r["step_time_s"]:.3f} | '
              f'{r["peak_rss_mib"]:.0f} |')
    return rows


if __name__ == '__main__':
    main()
