import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
            depends=['sasa_mmdet/layers/csrc/local_attention_core.h'],
            extra_compile_args=flags,
            extra_link_args=['-fopenmp'])
    ]


def onnxruntime_include_dir():
    """onnxruntime's C/C++ API headers: $ONNXRUNTIME_INCLUDE_DIR, Debian's
    libonnxruntime-dev, or what tools/deployment/install_onnxruntime_headers.sh
    unpacked into the cache; None if none has them."""
    cache = os.environ.get('SASA_MMDET_CACHE',
                           os.path.join(os.path.expanduser('~'), '.cache', 'sasa_mmdet'))
    for directory in (os.environ.get('ONNXRUNTIME_INCLUDE_DIR'), '/usr/include/onnxruntime',
                      os.path.join(cache, 'onnxruntime-headers', 'include', 'onnxruntime')):
        if directory and os.path.isfile(os.path.join(directory, 'onnxruntime_cxx_api.h')):
            return directory
    return None


def onnxruntime_extensions():
    """The onnxruntime custom-op library (sasa_mmdet::LocalAttention), built
    from the CPU backend's kernel source (csrc/local_attention_core.h); no
    torch, no onnxruntime library at link time (onnxruntime hands it its API
    when it loads it). Skipped, with a message, without onnxruntime's headers."""
    from setuptools import Extension
    include = onnxruntime_include_dir()
    if include is None:
        print('sasa_mmdet: onnxruntime C/C++ headers not found: the onnxruntime custom-op '
              'library is not built (bash tools/deployment/install_onnxruntime_headers.sh, '
              'or set ONNXRUNTIME_INCLUDE_DIR)')
        return []
    flags = ['-O3', '-std=c++17', '-fvisibility=hidden']
    if os.environ.get('SASA_MMDET_PORTABLE', '0') != '1':
        flags.append('-march=native')
    return [
        Extension(
            'sasa_mmdet.deployment._onnxruntime_ops',
            ['sasa_mmdet/deployment/csrc/onnxruntime_local_attention.cpp'],
            include_dirs=[include, os.path.join(ROOT, 'sasa_mmdet', 'layers', 'csrc')],
            depends=['sasa_mmdet/layers/csrc/local_attention_core.h'],
            extra_compile_args=flags,
            language='c++')
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
    ext_modules=cpu_extensions() + onnxruntime_extensions(),
    cmdclass={'build_ext': build_ext_class()},
    zip_safe=False,
)
