"""Packaging: the default build is portable, the metadata's version ranges
admit the pinned set-up, and the extension list is one function."""
import os.path as osp
import re
import runpy

import pytest
import setuptools

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
tomllib = pytest.importorskip('tomllib')  # Python >= 3.11
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402


def build_flags(monkeypatch, native=None):
    """The compile flags setup.py gives each compiled extension, by name
    (setup() not run); the same for all of them."""
    if native is None:
        monkeypatch.delenv('SASA_MMDET_NATIVE', raising=False)
    else:
        monkeypatch.setenv('SASA_MMDET_NATIVE', native)
    captured = {}
    monkeypatch.setattr(setuptools, 'setup', lambda **kw: captured.update(kw))
    runpy.run_path(osp.join(ROOT, 'setup.py'), run_name='__main__')
    extensions = {ext.name: ext for ext in captured['ext_modules']}
    assert {'sasa_mmdet.layers._local_attention_cpu',
            'sasa_mmdet.layers._san_cpu'} <= set(extensions)
    flags = {name: ext.extra_compile_args for name, ext in extensions.items()}
    native = {name: '-march=native' in f for name, f in flags.items()}
    assert len(set(native.values())) == 1, native  # one build choice for all
    return flags['sasa_mmdet.layers._local_attention_cpu']


def test_default_build_is_portable(monkeypatch):
    flags = build_flags(monkeypatch)
    assert not any(flag.startswith('-march') for flag in flags)
    assert '-O3' in flags and '-fopenmp' in flags


def test_native_build_on_request(monkeypatch):
    assert '-march=native' in build_flags(monkeypatch, '1')
    assert '-march=native' not in build_flags(monkeypatch, '0')
    with pytest.raises(ValueError, match='SASA_MMDET_NATIVE must be 0 or 1'):
        build_flags(monkeypatch, 'yes')


def pinned(path):
    pins = {}
    with open(osp.join(ROOT, 'requirements', path)) as f:
        for line in f:
            match = re.match(r'([\w-]+)==([\w.]+)', line.strip())
            if match:
                pins[match.group(1).lower()] = Version(match.group(2))
    return pins


def test_metadata_ranges_admit_the_pinned_set_up():
    with open(osp.join(ROOT, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    assert project['requires-python'] == '>=3.10,<3.13'
    requirements = [Requirement(r) for r in project['dependencies']]
    for extra in project['optional-dependencies'].values():
        requirements += [Requirement(r) for r in extra]
    pins = {**pinned('runtime.txt'), **pinned('constraints.txt'),
            'mmcv': Version('2.1.0')}  # built by tools/setup_env.sh
    names = {req.name.lower() for req in requirements}
    assert {'torch', 'mmengine', 'mmdet', 'mmcv', 'mmpretrain'} <= names
    for req in requirements:
        version = pins.get(req.name.lower())
        if version is not None:
            assert req.specifier.contains(version, prereleases=True), \
                (str(req), str(version))
    # no exact pins in the metadata
    assert not [str(req) for req in requirements
                if any(spec.operator == '==' for spec in req.specifier)]
    # mmdet 3.x asks for mmcv >= 2.0.0rc4, < 2.2.0
    (mmcv, ) = [req for req in requirements if req.name == 'mmcv']
    assert mmcv.specifier.contains('2.0.0rc4', prereleases=True)
    assert not mmcv.specifier.contains('2.2.0')
