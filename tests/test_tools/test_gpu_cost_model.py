"""tools/analysis_tools/gpu_cost_model.py and check_triton_kernels.py: the
launch capture, Triton's specialisation, the SASS reading and the compile
check, without a GPU.

The compile tests need Triton's CUDA backend and its bundled ptxas and
cuobjdump (they ship with the triton wheel); they are skipped, saying so,
where those are missing. No time is asserted.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS = osp.join(ROOT, 'tools', 'analysis_tools')
sys.path.insert(0, TOOLS)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import gpu_cost_model as model  # noqa: E402

triton = pytest.importorskip('triton')
from triton.runtime.jit import JITFunction  # noqa: E402

import gpu_cost_model_kernels  # noqa: E402  (beside this file)


def _nvidia_tools_missing() -> str:
    try:
        for tool in ('ptxas', 'cuobjdump'):
            model.nvidia_tool(tool)
        from triton.backends import backends
        if 'nvidia' not in backends:
            return "triton has no 'nvidia' backend"
    except FileNotFoundError as error:
        return str(error)
    return ''


needs_ptxas = pytest.mark.skipif(bool(_nvidia_tools_missing()),
                                 reason=f'no Triton CUDA toolchain: {_nvidia_tools_missing()}')


# Plain JITFunctions (not @triton.jit: the tests run with TRITON_INTERPRET=1,
# under which that would make an interpreted function). They are launched
# (recorded) and specialised here; compiling needs TRITON_INTERPRET unset
# (Triton's code generator reads it), so that runs in a subprocess.
LOOPED_SUM = JITFunction(gpu_cost_model_kernels.looped_sum)
LOOPED_SUM_ANY_WIDTH = JITFunction(gpu_cost_model_kernels.looped_sum, do_not_specialize=['W'])


def _capture(kernel, *args, **kwargs):
    recorder = model.LaunchRecorder(backend_module=object())
    with recorder.active('forward'):
        kernel[(3, )](*args, **kwargs)
    assert len(recorder.launches) == 1
    return recorder.launches[0]


def test_specialisation_is_tritons_own():
    """Ints divisible by 16 and 16-byte-aligned pointers are marked, ints
    equal to 1 become constants, do_not_specialize is honoured, and a
    pointer 2 bytes into its storage is not aligned."""
    x = torch.zeros(64, 48, dtype=torch.bfloat16)
    out = torch.zeros(3, 16)
    spec = model.specialise_launch(_capture(LOOPED_SUM, x, out, 32, 48, BLOCK=16), 90)
    assert model.specialised_names(LOOPED_SUM, spec) == ['OUT', 'W', 'X', 'n']
    assert spec['signature']['X'] == '*bf16' and spec['signature']['OUT'] == '*fp32'

    spec = model.specialise_launch(_capture(LOOPED_SUM, x.view(-1)[1:], out, 1, 44, BLOCK=16),
                                   90)
    assert model.specialised_names(LOOPED_SUM, spec) == ['OUT']
    assert spec['signature']['n'] == 'constexpr'  # n == 1

    spec = model.specialise_launch(_capture(LOOPED_SUM_ANY_WIDTH, x, out, 32, 48, BLOCK=16), 80)
    assert model.specialised_names(LOOPED_SUM_ANY_WIDTH, spec) == ['OUT', 'X', 'n']
    assert spec['options'].arch == 'sm80'


def test_recorder_runs_nothing_and_restores_triton():
    run = JITFunction.run
    out = torch.zeros(3, 16)
    launch = _capture(LOOPED_SUM, torch.ones(8, 16), out, 8, 16, BLOCK=16)
    assert JITFunction.run is run
    assert torch.count_nonzero(out) == 0  # recorded, not executed
    assert launch['grid'] == (3, ) and launch['phase'] == 'forward'
    assert model.launch_grid(launch, {}) == (3, 1, 1)


@needs_ptxas
def test_loop_trip_count_weights_the_sass():
    """The runtime loop of n trips is found in the SASS, as ptxas built it
    (unrolled by k: a main loop and a remainder loop, or not), and its
    bodies counted n // k and n % k times."""
    for n in (5, 32):
        proc = subprocess.run(
            [sys.executable, osp.join(osp.dirname(osp.abspath(__file__)),
                                      'gpu_cost_model_kernels.py'), str(n)],
            capture_output=True, text=True,
            env={k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'})
        assert proc.returncode == 0, proc.stderr[-3000:]
        stats = json.loads(proc.stdout.splitlines()[-1])
        assert 'error' not in stats, stats['error']
        assert stats['registers'] > 0 and stats['stack_bytes'] == 0
        assert stats['loops_resolved'] and stats['ldg'] and stats['mma'] == 0
        loops = sorted(stats['loops'], key=lambda loop: -loop['static'])
        if len(loops) == 2:
            k = loops[0]['unrolled']
            assert k > 1 and [loop['executions'] for loop in loops] == [n // k, n % k]
        else:
            assert [loop['executions'] for loop in loops] == [n]
        static_outside = stats['static'] - sum(loop['static'] for loop in loops)
        assert stats['weighted'] == static_outside + sum(
            loop['static'] * loop['executions'] for loop in loops)


SASS = """
        /*0000*/                   S2R R0, SR_CTAID.X ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0030*/                   LDG.E.U16 R5, desc[UR4][R2.64] ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/               @P0 BRA 0x30 ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
        /*00a0*/                   NOP;
"""
TTGIR = """
  tt.func public @k(%X: !tt.ptr<bf16> {tt.divisibility = 16 : i32} loc("X"(#loc)), %KH: i32 loc("KH"(#loc)), %KW: i32 loc("KW"(#loc))) attributes {noinline = false} {
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c1_i32 = arith.constant 1 : i32 loc(#loc1)
    %c2_i32 = arith.constant 2 : i32 loc(#loc1)
    %0 = arith.muli %KW, %c2_i32 : i32 loc(#loc2)
    %r = scf.for %ty = %c0_i32 to %KH step %c1_i32 iter_args(%a = %c0_i32) -> (i32)  : i32 {
      %s = scf.for %tx = %c0_i32 to %0 step %c1_i32 iter_args(%b = %a) -> (i32)  : i32 {
        scf.yield %b : i32 loc(#loc3)
      } loc(#loc4)
      scf.yield %s : i32 loc(#loc5)
    } loc(#loc6)
    tt.return loc(#loc7)
  } loc(#loc)
"""


def test_sass_counts_weighted_by_nested_trip_counts():
    """Outer loop 0x10-0x60 runs KH = 3 times, the inner 0x30-0x50 2 * KW =
    8 times per outer trip; the branch-to-self and NOP after EXIT are not
    counted."""
    stats = model.analyse_sass(SASS, TTGIR, dict(KH=3, KW=4))
    assert stats['loops_resolved']
    assert [loop['executions'] for loop in stats['loops']] == [3, 24]
    assert stats['static'] == 9
    # S2R, STG, EXIT once; LDG.128, HGMMA, BRA@0x60 x3; LDG.U16, BAR, BRA@0x50 x24
    assert stats['weighted'] == 3 + 3 * 3 + 3 * 24
    assert stats['mma'] == 3 and stats['mma_flops'] == 3 * 2 * 64 * 64 * 16 // 4
    assert stats['ldg'] == {'128-bit': 1, '16-bit': 1} and stats['stg'] == {'64-bit': 1}
    assert stats['barriers'] == 24 and stats['barriers_static'] == 1
    assert stats['ld_bytes'] == 32 * (16 * 3 + 2 * 24)
    assert stats['mix'] == {'integer and other': 1, 'global memory': 3 + 24 + 1,
                            'tensor core': 3, 'sync and control': 24 + 3 + 24 + 1}


def test_tensor_core_flops_per_warp_instruction():
    assert model.mma_flops('HMMA.16816.F32.BF16') == 2 * 16 * 8 * 16
    assert model.mma_flops('HMMA.1688.F32.TF32') == 2 * (2 * 16 * 8 * 8)  # half rate
    assert model.mma_flops('HGMMA.64x32x16.F32.BF16') == 2 * 64 * 32 * 16 // 4
    assert model.mma_flops('FFMA') == 0


def test_unknown_trip_count_is_reported_not_guessed():
    stats = model.analyse_sass(SASS, TTGIR, dict(KH=3))  # KW unknown
    assert not stats['loops_resolved']
    assert [loop['executions'] for loop in stats['loops']] == [3, 3]


def test_trip_count_depending_on_the_program_is_averaged():
    ttgir = """
  tt.func public @k(%N: i32 loc("N"(#loc))) attributes {noinline = false} {
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c1_i32 = arith.constant 1 : i32 loc(#loc1)
    %0 = tt.get_program_id x : i32 loc(#loc2)
    %1 = arith.subi %N, %0 : i32 loc(#loc2)
    scf.for %i = %c0_i32 to %1 step %c1_i32  : i32 {
    } loc(#loc3)
    tt.return loc(#loc7)
  } loc(#loc)
"""
    (loop, ) = model.ttgir_loops(ttgir, dict(N=10), grid=(4, 1, 1))
    assert loop['per_program'] and loop['trips'] == (10 + 9 + 8 + 7) / 4


def test_conv_model_and_occupancy():
    conv = model.conv_model(90, 256, 80, 80, 8)
    gpu = model.GPUS[90]
    flops = 2 * 8 * 80 * 80 * 9 * 256 * 256
    assert conv['forward_us'] == pytest.approx(
        flops / (gpu['tensor_tflops_bf16'] * 1e12 * model.GEMM_EFFICIENCY) * 1e6)
    assert conv['total_us'] == pytest.approx(3 * conv['forward_us'])
    assert model.conv_model(90, 256, 1, 1, 1)['total_us'] == 3 * model.KERNEL_FLOOR_US
    assert model.occupancy(gpu, 128, 0, 4) == 4  # registers: 65536 / (128 * 128)
    assert model.occupancy(gpu, 64, 100 * 1024, 4) == 2  # shared memory
    assert model.flipped_width(80) == 84 and model.flipped_width(84) == 96


def _tool(name, *args):
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    return subprocess.run([sys.executable, osp.join(TOOLS, name), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env)


@pytest.mark.parametrize('args, message', [
    (('--shapes', '16,8'), 'C,H,W'),
    (('--shapes', '12,8,8'), 'divisible by 8 heads'),
    (('--batch', '0'), '--batch must be positive'),
])
def test_cost_model_refuses_bad_arguments(args, message):
    proc = _tool('gpu_cost_model.py', *args)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize('args, message', [
    (('--head-dims', '256'), 'between 1 and 128'),
    (('--sizes', '8by8'), 'HxW'),
    (('--layers', 'natten'), 'invalid choice'),
])
def test_compile_check_refuses_bad_arguments(args, message):
    proc = _tool('check_triton_kernels.py', *args)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.slow
@needs_ptxas
def test_layer_kernels_compile_for_sm90_without_spills(tmp_path):
    """What CI compiles: the layer's launches at a head width of 16 and a
    width divisible by 16 and one not, planar and channels-last, for sm_90,
    exactly specialised; channels-last q, k, v are read with 128-bit loads,
    and a contiguous input gets the same kernels as a channels-last one."""
    proc = _tool('check_triton_kernels.py', '--layers', 'sasa', '--arch', '90', '--head-dims',
                 '16', '--dtypes', 'bfloat16', '--logits', 'qk+qr', '--sizes', '12x16', '12x20',
                 '--memory-formats', 'contiguous', 'channels_last', 'planar',
                 '--json', str(tmp_path / 'kernels.json'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '0 compile errors, 0 with register spills' in proc.stdout
    rows = json.loads((tmp_path / 'kernels.json').read_text())['rows']
    assert {r['arch'] for r in rows} == {'sm_90'}
    assert {tuple(r['size']) for r in rows} == {(12, 16), (12, 20)}
    assert {r['phase'] for r in rows} == {'forward', 'backward'}
    assert all(r['registers'] > 0 and r['spill_bytes'] == 0 for r in rows)
    assert {r['layer'] for r in rows} == {'sasa'}
    variants = {memory_format: [r['variant'] for r in rows if r['memory_format'] == memory_format]
                for memory_format in ('contiguous', 'channels_last', 'planar')}
    assert variants['contiguous'] == variants['channels_last']
    assert not set(variants['planar']) & set(variants['channels_last'])
    assert all(r['load_bits'][0] == 128 for r in rows if r['memory_format'] != 'planar')
    assert all(r['load_bits'][0] < 128 for r in rows if r['memory_format'] == 'planar')


SAN_KERNELS = {'_aggregation_fwd', '_aggregation_bwd_weight', '_aggregation_bwd_value',
               '_gather_fwd', '_gather_bwd'}


@pytest.mark.slow
@needs_ptxas
def test_san_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    """SAN's pairwise and patchwise layers with impl='triton', in both
    border modes, forward and backward: every kernel they launch compiles
    for sm_80 and sm_90, exactly specialised, without spills, at a width
    divisible by 16 and one not; the SASS's load widths are reported."""
    proc = _tool('check_triton_kernels.py', '--layers', 'san', '--arch', '80', '90', '--dtypes',
                 'bfloat16', '--sizes', '12x16', '12x20', '--json', str(tmp_path / 'san.json'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '0 compile errors, 0 with register spills' in proc.stdout
    rows = json.loads((tmp_path / 'san.json').read_text())['rows']
    assert {r['layer'] for r in rows} == {'san'}
    assert {r['kernel'] for r in rows} == SAN_KERNELS
    assert {r['arch'] for r in rows} == {'sm_80', 'sm_90'}
    assert {(r['san_layer'], r['border']) for r in rows} == {
        (layer, border) for layer in ('pairwise', 'patchwise') for border in ('reflect', 'mask')}
    assert {tuple(r['size']) for r in rows} == {(12, 16), (12, 20)}
    assert {r['phase'] for r in rows} == {'forward', 'backward'}
    assert all(r['registers'] > 0 and r['spill_bytes'] == 0 for r in rows)
    # every kernel reads global memory; widths are bits per thread
    assert all(r['load_bits'] and set(r['load_bits']) <= {16, 32, 64, 128} for r in rows)


@pytest.mark.slow
@needs_ptxas
def test_cost_model_table_json_and_sass(tmp_path):
    proc = _tool('gpu_cost_model.py', '--arch', '90', '--shapes', '128,12,16', '--batch', '2',
                 '--json', str(tmp_path / 'model.json'), '--dump', str(tmp_path / 'sass'),
                 '--markdown', str(tmp_path / 'table.md'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / 'model.json').read_text())
    assert [(r['height'], r['width']) for r in result['rows']] == [(12, 16), (12, 20)]
    entry = result['rows'][0]['archs']['90']
    kernels = entry['kernels']
    assert {k['phase'] for k in kernels} == {'forward', 'backward'}
    for k in kernels:
        assert k['warp_instructions_per_pixel'] > 0 and k['predicted_us'] > 0
        assert k['compulsory_bytes_per_pixel'] > 0
    assert entry['layer_us'] == pytest.approx(entry['forward']['layer_us']
                                              + entry['backward']['layer_us'])
    assert entry['ratio_to_conv'] == pytest.approx(entry['layer_us'] / entry['conv']['total_us'])
    assert 0 < entry['floor_us'] <= entry['layer_us']
    assert result['targets']['90'] and 'Targets, sm_90' in proc.stdout
    dumped = os.listdir(tmp_path / 'sass')
    assert len(dumped) == len({k['variant'] for r in result['rows']
                               for k in r['archs']['90']['kernels']})
    assert all(name.startswith('sm90_') and name.endswith('.sass') for name in dumped)
    table = (tmp_path / 'table.md').read_text()
    assert '| C128 (128, 12 x 16) | 16 |' in table and 'Targets on sm_90' in table


def _benchmark_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('benchmark_tool',
                                                  osp.join(ROOT, 'tools', 'benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modelled_shapes_are_the_benchmarked_ones():
    """Calibration pairs rows by shape: the model's shapes and their
    flipped widths are the GPU benchmark's 640 presets."""
    presets = _benchmark_module().PRESETS
    shapes = [(c, h, w) for _, c, h, w in model.SHAPES]
    assert shapes == presets['resnet50-640'] + presets['fpn-head-640']
    assert [(c, h, model.flipped_width(w)) for c, h, w in shapes] == (
        presets['resnet50-640-wflip'] + presets['fpn-head-640-wflip'])


def _model_row(shape, layer_us, conv_us):
    channels, height, width = shape
    return dict(channels=channels, height=height, width=width, batch=8,
                archs={'90': dict(layer_us=layer_us, conv=dict(total_us=conv_us),
                                  ratio_to_conv=layer_us / conv_us)})


def test_calibration_puts_measurements_beside_predictions(tmp_path):
    modelled = tmp_path / 'model.json'
    modelled.write_text(json.dumps(dict(
        triton='3.8.0', kernel_source=dict(backend_sha1='0123456789ab'),
        rows=[_model_row((256, 80, 80), 200.0, 100.0), _model_row((256, 80, 84), 300.0, 120.0)])))
    bench = tmp_path / 'benchmark.json'
    layer = dict(kind='layer', batch=8, dtype='bfloat16', preset='fpn-head-640')
    bench.write_text(json.dumps(dict(meta=dict(gpu='NVIDIA H100 80GB HBM3', triton='3.6.0'),
                                     rows=[
        dict(layer, shape=[256, 80, 80], impl='triton bfloat16', time_s=400e-6,
             conv_time_s=150e-6),
        dict(layer, shape=[256, 80, 80], impl='torch bfloat16', time_s=9e-3, conv_time_s=1e-4),
        dict(layer, shape=[256, 40, 40], impl='triton bfloat16', time_s=1e-4, conv_time_s=1e-4),
        dict(layer, shape=[256, 80, 84], impl='triton bfloat16', error='OutOfMemoryError'),
    ])))
    rows = model.calibrate(str(modelled), [str(bench)], str(tmp_path / 'out'))
    assert len(rows) == 1  # the PyTorch row, the unmodelled shape and the failed case drop out
    row = rows[0]
    assert row['shape'] == [256, 80, 80]
    assert row['measured_over_predicted'] == pytest.approx(2.0)
    assert row['conv_measured_over_predicted'] == pytest.approx(1.5)
    assert row['ratio_to_conv_measured'] == pytest.approx(400 / 150)
    assert row['ratio_to_conv_predicted'] == pytest.approx(2.0)
    saved = json.loads((tmp_path / 'out' / 'calibration.json').read_text())
    assert saved['rows'] == rows
    assert any('kernels changed since the model' in note for note in saved['notes'])
    table = (tmp_path / 'out' / 'calibration.md').read_text()
    assert '| 256, 80, 80 (8) | 400 | 200 | 2.00 | 150 | 100 | 1.50 | 2.67 | 2.00 |' in table


def test_calibrate_refuses_missing_files(tmp_path):
    proc = _tool('gpu_cost_model.py', '--calibrate', str(tmp_path / 'none.json'),
                 '--model-json', str(tmp_path / 'model.json'))
    assert proc.returncode == 2 and 'no such file' in proc.stderr


def test_gpu_check_script_parses_and_plans_both_widths():
    script = osp.join(ROOT, 'tools', 'gpu_check.sh')
    assert subprocess.run(['bash', '-n', script]).returncode == 0
    proc = subprocess.run(['bash', script, '--dry-run', 'work_dirs/plan'], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.startswith('+ timeout')]
    assert any('tests/test_layers/test_triton_kernels.py' in s for s in steps)
    assert any('--preset resnet50-640 --preset fpn-head-640' in s and 'triton torch' in s
               for s in steps)
    assert any('--preset resnet50-640-wflip --preset fpn-head-640-wflip' in s for s in steps)
    calibration = next(s for s in steps if '--calibrate' in s)
    assert 'benchmark/benchmark.json' in calibration and 'benchmark-wflip' in calibration
    # SAN's Triton tests on CUDA, then its ops timed beside the PyTorch path
    assert 'tests/test_layers/test_san_ops.py' in steps[4] and '-k triton' in steps[4]
    assert 'san_op_timing.py' in steps[5] and '--shape 8,256,80,80' in steps[5]
    # The required steps' budgets fit the 10 minutes with room for set-up;
    # the optional ones run on what is left.
    assert sum(int(s.split()[2]) for s in steps[:6]) <= 570
    assert any('--impls triton flex' in s for s in steps[6:])
    bad = subprocess.run(['bash', script, '--bogus'], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and 'unknown option' in bad.stderr


def test_san_op_timing_needs_a_gpu_and_checks_its_arguments(tmp_path):
    proc = _tool('san_op_timing.py', '--shape', '8,256,80')
    assert proc.returncode == 2 and 'B,C,H,W' in proc.stderr
    proc = _tool('san_op_timing.py', '--shape', '1,12,8,8', '--share-planes', '8')
    assert proc.returncode == 2 and 'must divide the channels' in proc.stderr
    if not torch.cuda.is_available():
        proc = _tool('san_op_timing.py', '--out', str(tmp_path))
        assert proc.returncode == 2 and 'needs a CUDA GPU' in proc.stderr
