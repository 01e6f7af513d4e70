import os

from setuptools import find_packages, setup


def cpu_extensions():
    """The compiled local-attention CPU kernel (needs torch at build time:
    install with ``pip install -e . --no-build-isolation``)."""
    from torch.utils.cpp_extension import CppExtension
    flags = ['-O3', '-fopenmp']
    # Tuned for the building machine unless asked not to (portable wheels).
    if os.environ.get('SASA_MMDET_PORTABLE', '0') != '1':
        flags.append('-march=native')
    return [
        CppExtension(
            'sasa_mmdet.layers._local_attention_cpu',
            ['sasa_mmdet/layers/csrc/local_attention_cpu.cpp'],
            extra_compile_args=flags,
            extra_link_args=['-fopenmp']),
        # SAN's neighbourhood operators (sasa_mmdet/layers/san_ops.py)
        CppExtension(
            'sasa_mmdet.layers._san_cpu',
            ['sasa_mmdet/layers/csrc/san_cpu.cpp'],
            extra_compile_args=flags,
            extra_link_args=['-fopenmp']),
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name='sasa_mmdet',
    version='0.1.0',
    description='Stand-Alone Self-Attention (Ramachandran et al., 2019) '
    'for MMDetection 3.x: local attention layer, attention ResNet, FPN and '
    'RetinaNet head',
    packages=find_packages(include=['sasa_mmdet', 'sasa_mmdet.*']),
    python_requires='>=3.11,<3.12',
    install_requires=['mmdet==3.3.0', 'mmengine==0.10.7', 'mmcv==2.1.0'],
    ext_modules=cpu_extensions(),
    cmdclass={'build_ext': build_ext_class()},
    zip_safe=False,
)
