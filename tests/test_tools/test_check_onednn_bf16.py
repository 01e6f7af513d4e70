"""tools/analysis_tools/check_onednn_bf16.py: the measurement runs, counts
every call once, and the workaround's column is right by construction
(narrow maps run in float32)."""
import importlib.util
import json
import os.path as osp
import re

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    'check_onednn_bf16', osp.join(ROOT, 'tools', 'analysis_tools', 'check_onednn_bf16.py'))
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def test_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / 'onednn.json'
    assert check.main(['--calls', '3', '--json', str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result['onednn_bf16'] == check.onednn_runs_bf16_convolutions()
    rows = [line for line in table.splitlines() if re.match(r'\| \d+x\d+ \|', line)]
    assert len(result['cases']) == len(check.CASES) == len(rows)
    for row in result['cases']:
        for counts in (row['raw'], row['workaround']):
            assert counts['calls'] == 3
            assert counts['bad'] == counts['nan'] + counts['wrong'] <= 3
        if min(row['size']) < row['stride']:  # the workaround runs it in float32
            assert row['workaround']['bad'] == 0


def test_gradient_check_rejects_nan_and_garbage():
    import torch
    expected = torch.linspace(-1, 1, 16, dtype=torch.float64)
    assert check.gradient_is_right(expected * (1 + 5e-3), expected)
    assert not check.gradient_is_right(expected * 1.5, expected)
    bad = expected.clone()
    bad[3] = float('nan')
    assert not check.gradient_is_right(bad, expected)


@pytest.mark.parametrize('calls', ['0', '-2'])
def test_calls_must_be_positive(calls, capsys):
    with pytest.raises(SystemExit):
        check.parse_args(['--calls', calls])
    assert '--calls must be at least 1' in capsys.readouterr().err
