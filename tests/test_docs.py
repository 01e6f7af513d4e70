"""The README and docs/ stay true: every repository path, config and tool
they name exists, every test they cite exists, every relative link
resolves, the README stays a front page and links every docs page."""
import glob
import os.path as osp
import re

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
README = osp.join(ROOT, 'README.md')
README_MAX_LINES = 250
# Pages the README's documentation index must link.
DOC_PAGES = [
    'docs/install.md', 'docs/get_started.md',
    'docs/user_guides/use_in_your_config.md',
    'docs/user_guides/reproduce_the_paper.md',
    'docs/user_guides/train_on_gpus.md', 'docs/design.md',
    'docs/benchmarks.md', 'docs/deployment.md', 'docs/analysis_tools.md',
    'docs/reliability.md', 'docs/faq.md', 'docs/san.md', 'docs/gpu_kernels.md',
    'CHANGELOG.md'
]
PAGES = sorted([README, osp.join(ROOT, 'CHANGELOG.md'),
                osp.join(ROOT, 'configs', 'sasa', 'README.md')] +
               glob.glob(osp.join(ROOT, 'docs', '**', '*.md'), recursive=True))
# Repository paths as the pages write them: a top-level folder of the
# repository, then a path (globs allowed), optionally `::test_name`.
REPO_DIRS = ('configs', 'tools', 'tests', 'docs', 'sasa_mmdet', 'demo',
             'requirements')
PATH = re.compile(r'(?<![\w./:-])((?:%s)/[\w./*<>@+{},-]*[\w*/}])(?:::(\w+))?' %
                  '|'.join(REPO_DIRS))
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
# Placeholders a page uses for a folder of the user's choice.
PLACEHOLDER = re.compile(r'<[^>]*>')


def page_id(path):
    return osp.relpath(path, ROOT)


def named_paths(text):
    """(path, test name or None) of every repository path in ``text``."""
    for match in PATH.finditer(text):
        path, test = match.group(1), match.group(2)
        yield path.rstrip('.'), test


def expand_braces(path):
    """Every path a shell's brace expansion gives, e.g. ``a_{b,c}.py``."""
    match = re.search(r'\{([^{}]*)\}', path)
    if match is None:
        return [path]
    return [expanded for choice in match.group(1).split(',')
            for expanded in expand_braces(path[:match.start()] + choice + path[match.end():])]


def exists(path):
    if '{' in path:
        return all(exists(each) for each in expand_braces(path))
    if PLACEHOLDER.search(path):
        # e.g. configs/sasa/retinanet_<...>-r50-in1k-pre_<...>_1x_coco.py
        path = PLACEHOLDER.sub('*', path)
    full = osp.join(ROOT, path)
    if '*' in path:
        return bool(glob.glob(full, recursive=True))
    return osp.exists(full)


def test_brace_patterns_expand_and_must_all_exist():
    assert expand_braces('a_{b,c}-{d,e}.py') == ['a_b-d.py', 'a_b-e.py', 'a_c-d.py', 'a_c-e.py']
    assert exists('configs/san/retinanet_san{10,15}-pairwise_fpn_1x_coco.py')
    assert not exists('configs/san/retinanet_san{10,11}-pairwise_fpn_1x_coco.py')


def test_pages_found():
    assert len(PAGES) >= len(DOC_PAGES) + 2


@pytest.mark.parametrize(
    'page', [page for page in PAGES if not page.endswith('CHANGELOG.md')],
    ids=page_id)  # the changelog names old paths on purpose
def test_every_named_path_and_test_exists(page):
    with open(page) as f:
        text = f.read()
    missing, missing_tests = [], []
    for path, test in named_paths(text):
        if not exists(path):
            missing.append(path)
        elif test is not None:
            with open(osp.join(ROOT, path)) as f:
                if not re.search(rf'def {test}\b', f.read()):
                    missing_tests.append(f'{path}::{test}')
    assert not missing, f'{page_id(page)} names paths that do not exist: ' \
        f'{sorted(set(missing))}'
    assert not missing_tests, f'{page_id(page)} cites tests that do not ' \
        f'exist: {missing_tests}'


@pytest.mark.parametrize('page', PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    with open(page) as f:
        text = f.read()
    broken = []
    for target in LINK.findall(text):
        if re.match(r'[a-z]+:', target) or target.startswith('#'):
            continue
        path, _, anchor = target.partition('#')
        full = osp.normpath(osp.join(osp.dirname(page), path))
        if not osp.exists(full):
            broken.append(target)
            continue
        if anchor and full.endswith('.md'):
            with open(full) as f:
                if anchor not in headings(f.read()):
                    broken.append(target)
    assert not broken, f'{page_id(page)} has broken links: {broken}'


def headings(markdown):
    """GitHub's anchors of the page's headings."""
    anchors = set()
    for line in markdown.split('\n'):
        match = re.match(r'#+ (.*)', line)
        if match:
            title = match.group(1).strip().lower()
            title = re.sub(r'[^\w\- ]', '', title)
            anchors.add(title.replace(' ', '-'))
    return anchors


def test_readme_is_a_front_page():
    with open(README) as f:
        lines = f.read().split('\n')
    assert len(lines) <= README_MAX_LINES, \
        f'README.md has {len(lines)} lines; keep it under {README_MAX_LINES}'


def test_readme_links_every_docs_page():
    with open(README) as f:
        links = {osp.normpath(target.partition('#')[0])
                 for target in LINK.findall(f.read())}
    assert not [page for page in DOC_PAGES if page not in links]
    for page in DOC_PAGES:
        assert osp.isfile(osp.join(ROOT, page)), page


def test_readme_test_command_is_what_ci_runs():
    with open(README) as f:
        readme = f.read()
    with open(osp.join(ROOT, '.ci', 'run')) as f:
        ci = [line for line in f.read().split('\n')
              if line and not line.startswith(('#', 'set ', 'cd '))]
    assert ci == ['bash tools/run_tests.sh']
    assert 'bash tools/run_tests.sh' in readme


def test_checker_catches_what_it_should():
    """The checks fail on a missing path, test, link and anchor."""
    assert not exists('configs/no_such_config.py')
    assert exists('configs/sasa/*_1x_coco.py')
    assert exists('configs/sasa/retinanet_<...>-r50-in1k-pre_<...>_1x_coco.py')
    found = list(named_paths(
        'see `tests/test_docs.py::test_readme_is_a_front_page` and '
        '(configs/sasa/README.md), not mmdet::retinanet/x.py or '
        'work_dirs/configs/x.py'))
    assert found == [('tests/test_docs.py', 'test_readme_is_a_front_page'),
                     ('configs/sasa/README.md', None)]
    assert 'exact-resume' in headings('## Exact resume\n')
    assert 'the-layer-in-any-module-what-conv_cfg-does' in headings(
        '## The layer in any module: what `conv_cfg` does')
