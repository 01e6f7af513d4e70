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
        extra_compile_args=flags,
        extra_link_args=['-fopenmp'])


def extensions() -> list:
    """Every compiled extension of the package; add new ones here."""
    return [cpu_attention_extension()]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=extensions(), cmdclass={'build_ext': build_ext_class()})
