# Copyright (c) OpenMMLab. All rights reserved.
# Adapted from MMDetection 3.3.0 tools/test.py: imports sasa_mmdet
# (weights-only checkpoint loading) and adds gloo multi-process testing on
# CPU; the checkpoint fit check comes from the config's SafeCheckpointHook
# (configs/_base_/sasa_runtime.py). It also evaluates mmpretrain classifier
# configs (default_scope='mmpretrain', e.g. configs/imagenet/), with
# mmpretrain's meaning of --show-dir, --out and --tta.
import argparse
import logging
import os
import os.path as osp
import warnings
from copy import deepcopy

from mmdet.engine.hooks.utils import trigger_visualization_hook
from mmdet.evaluation import DumpDetResults
from mmdet.registry import RUNNERS
from mmdet.utils import setup_cache_size_limit_of_dynamo
from mmengine import ConfigDict
from mmengine.config import Config, DictAction
from mmengine.evaluator import DumpResults
from mmengine.logging import print_log
from mmengine.runner import Runner

import sasa_mmdet  # noqa: F401  (registers modules, weights-only loading)
from sasa_mmdet.engine import (finish_cpu_distributed, missing_runtime_hooks,
                               runtime_hooks_warning, setup_cpu_distributed)


# TODO: support fuse_conv_bn and format_only
def parse_args():
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a detector or an mmpretrain '
        'classifier')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='dump predictions to a pickle file for offline evaluation')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. '
        'If specified, it will be automatically saved '
        'to the work_dir/timestamp/show_dir')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--interval',
        type=int,
        default=1,
        help='classifier configs: draw every this many images with '
        '--show / --show-dir')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--tta', action='store_true')
    # When using PyTorch version >= 2.0.0, the `torch.distributed.launch`
    # will pass the `--local-rank` parameter to `tools/train.py` instead
    # of `--local_rank`.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def is_classifier_config(cfg: Config) -> bool:
    """Whether ``cfg`` is an mmpretrain config (its ``default_scope``)."""
    return cfg.get('default_scope') == 'mmpretrain'


def trigger_cls_visualization_hook(cfg: Config, args) -> Config:
    """mmpretrain's ``--show`` / ``--show-dir``: switch on its
    ``VisualizationHook`` (as mmpretrain's own tools/test.py does); images
    go to ``work_dir/show_dir`` for a relative ``--show-dir``."""
    if 'visualization' not in cfg.default_hooks:
        raise RuntimeError(
            '--show / --show-dir need default_hooks.visualization '
            "(mmpretrain's VisualizationHook) in the config")
    visualization = cfg.default_hooks.visualization
    visualization.enable = True
    visualization.show = args.show
    visualization.wait_time = args.wait_time
    # mmpretrain's hook writes where it is told (its own tools/test.py: the
    # current folder); a relative --show-dir goes below the work dir here
    visualization.out_dir = (
        osp.join(cfg.work_dir, args.show_dir)
        if args.show_dir and not osp.isabs(args.show_dir) else args.show_dir)
    visualization.interval = args.interval
    return cfg


def cls_tta_config(cfg: Config) -> Config:
    """mmpretrain's ``--tta``: average the scores of the image and its
    horizontal flip unless the config has its own ``tta_model`` /
    ``tta_pipeline``."""
    if 'tta_model' not in cfg:
        cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
    if 'tta_pipeline' not in cfg:
        test_pipeline = cfg.test_dataloader.dataset.pipeline
        cfg.tta_pipeline = deepcopy(test_pipeline)
        cfg.tta_pipeline[-1] = dict(
            type='TestTimeAug',
            transforms=[[
                dict(type='RandomFlip', prob=1.),
                dict(type='RandomFlip', prob=0.)
            ], [test_pipeline[-1]]])
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    return cfg


def main():
    args = parse_args()
    # Before anything is built or written (the work dir, its logs).
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must name a .pkl or .pickle file, got {args.out!r}')

    # Reduce the number of repeated compilations and improve
    # testing speed.
    setup_cache_size_limit_of_dynamo()

    # load config
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        # update configs according to CLI args if args.work_dir is not None
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        # use config filename as default work_dir if cfg.work_dir is None
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])

    cfg.load_from = args.checkpoint
    classifier = is_classifier_config(cfg)

    if args.show or args.show_dir:
        if classifier:
            cfg = trigger_cls_visualization_hook(cfg, args)
        else:
            cfg = trigger_visualization_hook(cfg, args)

    if args.tta and classifier:
        cfg = cls_tta_config(cfg)
    elif args.tta:

        if 'tta_model' not in cfg:
            warnings.warn('Cannot find ``tta_model`` in config, '
                          'we will set it as default.')
            cfg.tta_model = dict(
                type='DetTTAModel',
                tta_cfg=dict(
                    nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
        if 'tta_pipeline' not in cfg:
            warnings.warn('Cannot find ``tta_pipeline`` in config, '
                          'we will set it as default.')
            test_data_cfg = cfg.test_dataloader.dataset
            while 'dataset' in test_data_cfg:
                test_data_cfg = test_data_cfg['dataset']
            cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
            flip_tta = dict(
                type='TestTimeAug',
                transforms=[
                    [
                        dict(type='RandomFlip', prob=1.),
                        dict(type='RandomFlip', prob=0.)
                    ],
                    [
                        dict(
                            type='PackDetInputs',
                            meta_keys=('img_id', 'img_path', 'ori_shape',
                                       'img_shape', 'scale_factor', 'flip',
                                       'flip_direction'))
                    ],
                ])
            cfg.tta_pipeline[-1] = flip_tta
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline

    # The config carries SafeCheckpointHook (configs/_base_/sasa_runtime.py),
    # which refuses a checkpoint that does not fit; say so when it does not.
    missing = missing_runtime_hooks(cfg, needed=('SafeCheckpointHook', ))
    if missing:
        print_log(runtime_hooks_warning(missing), logger='current',
                  level=logging.WARNING)
    # gloo processes on CPU
    setup_cpu_distributed(cfg)

    # build the runner from config
    if 'runner_type' not in cfg:
        # build the default runner
        runner = Runner.from_cfg(cfg)
    else:
        # build customized runner from the registry
        # if 'runner_type' is set in the cfg
        runner = RUNNERS.build(cfg)

    # add `DumpResults` dummy metric
    if args.out is not None:
        dump = DumpResults if classifier else DumpDetResults
        runner.test_evaluator.metrics.append(dump(out_file_path=args.out))

    # start testing
    runner.test()
    finish_cpu_distributed()


if __name__ == '__main__':
    main()
