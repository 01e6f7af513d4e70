"""The public classes and functions import from the package itself."""
import subprocess
import sys

import torch

PUBLIC = ['LocalSelfAttention2d', 'AttentionStem', 'SASAResNet', 'SASAFPN', 'SASARetinaHead',
          'local_attention', 'local_attention_reference']


def test_public_names_import_from_the_package_in_a_fresh_interpreter():
    # a fresh process: nothing imported by other tests can hide an import cycle
    code = (f'from sasa_mmdet import {", ".join(PUBLIC)}\n'
            'import sasa_mmdet\n'
            f'missing = sorted(set({PUBLIC!r}) - set(sasa_mmdet.__all__))\n'
            'assert not missing, missing\n'
            'print("ok")\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith('ok')


def test_public_names_are_the_implementations():
    import importlib

    import sasa_mmdet
    from sasa_mmdet.layers import attention_stem, local_attention_ops
    from sasa_mmdet.models.backbones.sasa_resnet import SASAResNet
    from sasa_mmdet.models.dense_heads.sasa_retina_head import SASARetinaHead
    from sasa_mmdet.models.necks.sasa_fpn import SASAFPN

    # (sasa_mmdet.layers.local_attention is the function: import the module)
    layer_module = importlib.import_module('sasa_mmdet.layers.local_attention')
    assert sasa_mmdet.LocalSelfAttention2d is layer_module.LocalSelfAttention2d
    assert sasa_mmdet.AttentionStem is attention_stem.AttentionStem
    assert sasa_mmdet.local_attention is local_attention_ops.local_attention
    assert sasa_mmdet.local_attention_reference is local_attention_ops.local_attention_reference
    assert (sasa_mmdet.SASAResNet, sasa_mmdet.SASAFPN, sasa_mmdet.SASARetinaHead) == \
        (SASAResNet, SASAFPN, SASARetinaHead)


def test_readme_example_runs():
    from sasa_mmdet import LocalSelfAttention2d, local_attention, local_attention_reference

    layer = LocalSelfAttention2d(16, 32, 3, stride=2, num_heads=4, window_size=7)
    assert layer(torch.rand(2, 16, 25, 30)).shape == (2, 32, 13, 15)
    q, k, v = torch.randn(3, 1, 2, 4, 6, 5).unbind(0)
    torch.testing.assert_close(local_attention(q, k, v, (3, 3)),
                               local_attention_reference(q, k, v, (3, 3)))
