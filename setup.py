"""Build script for the compiled extensions; the package metadata is in
pyproject.toml.

The extensions compile against the torch already installed, so install with
``pip install -e . --no-build-isolation`` (an isolated build would fetch
another torch). The default build is portable (no ``-march=native``): the
same build runs on every x86-64 CPU of a cluster whose login and compute
nodes differ. ``SASA_MMDET_NATIVE=1`` tunes the CPU kernel for the building
machine's CPU instead (see docs/install.md and docs/benchmarks.md).
"""
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_build() -> bool:
    """Whether ``SASA_MMDET_NATIVE=1`` asks for ``-march=native``."""
    value = os.environ.get('SASA_MMDET_NATIVE', '0')
    if value not in ('0', '1'):
        raise ValueError(f'SASA_MMDET_NATIVE must be 0 or 1, got {value!r}')
    return value == '1'


def cpu_attention_extension():
    """The local-attention CPU kernel (``sasa_mmdet.layers._local_attention_cpu``)."""
    from torch.utils.cpp_extension import CppExtension
    flags = ['-O3', '-fopenmp']
    if native_build():
        flags.append('-march=native')
    return CppExtension(
        'sasa_mmdet.layers._local_attention_cpu',
        ['sasa_mmdet/layers/csrc/local_attention_cpu.cpp'],
        depends=['sasa_mmdet/layers/csrc/local_attention_core.h'],
        extra_compile_args=flags,
        extra_link_args=['-fopenmp'])


def san_cpu_extension():
    """SAN's neighbourhood operators on CPU (``sasa_mmdet.layers._san_cpu``,
    used by sasa_mmdet/layers/san_ops.py)."""
    from torch.utils.cpp_extension import CppExtension
    flags = ['-O3', '-fopenmp']
    if native_build():
        flags.append('-march=native')
    return CppExtension(
        'sasa_mmdet.layers._san_cpu', ['sasa_mmdet/layers/csrc/san_cpu.cpp'],
        extra_compile_args=flags,
        extra_link_args=['-fopenmp'])


def extensions() -> list:
    """Every compiled extension of the package; add new ones here."""
    return [cpu_attention_extension(), san_cpu_extension()] + onnxruntime_extensions()


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
    if native_build():
        flags.append('-march=native')
    # The kernel once per instruction set, the build's own first (see
    # csrc/local_attention_forward.inc; the library picks the CPU's best),
    # and the onnxruntime glue.
    csrc = 'sasa_mmdet/deployment/csrc'
    return [
        Extension(
            'sasa_mmdet.deployment._onnxruntime_ops',
            [f'{csrc}/local_attention_forward{isa}.cpp' for isa in ('', '_avx2', '_avx512')] +
            [f'{csrc}/onnxruntime_local_attention.cpp'],
            include_dirs=[include, os.path.join(ROOT, 'sasa_mmdet', 'layers', 'csrc')],
            depends=['sasa_mmdet/layers/csrc/local_attention_core.h',
                     f'{csrc}/local_attention_forward.h', f'{csrc}/local_attention_forward.inc'],
            extra_compile_args=flags,
            language='c++')
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=extensions(), cmdclass={'build_ext': build_ext_class()})
