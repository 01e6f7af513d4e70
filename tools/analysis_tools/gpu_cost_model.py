"""Static GPU cost model of the Triton attention kernels, without a GPU.

    python tools/analysis_tools/gpu_cost_model.py [--arch 90 80] [--json FILE]
        [--png FILE] [--markdown FILE] [--dump DIR] [--legacy FILE]
        [--shapes C,H,W ...] [--memory-format contiguous|channels_last|planar]
        [--source-root CHECKOUT]
    python tools/analysis_tools/gpu_cost_model.py --calibrate BENCHMARK_JSON ...
        [--model-json FILE] [--out DIR]    # tools/gpu_check.sh's measurements beside it

For every layer shape of a SASA ResNet-50 / FPN / RetinaNet head at a
640x640 batch of 8 (``SHAPES``; each also with its width changed so that
``W % 16`` flips, because Triton specialises ints divisible by 16), it

1. builds :class:`~sasa_mmdet.layers.LocalSelfAttention2d` as the models do
   (window 7, 8 heads, relative tables) and runs one forward and backward
   pass on CPU tensors under bfloat16 autocast, exactly as the GPU
   benchmark does on CUDA. Every Triton kernel launch is intercepted
   (``JITFunction.run`` is replaced while it runs: nothing executes) and
   recorded with its arguments, grid and launch options, whatever the
   kernels are called and whatever arguments they take;
2. derives the specialisation a launch on the GPU would get with Triton's
   own binder (``create_function_from_signature`` with the CUDA backend of
   the target): pointers 16-byte aligned or not (from the tensors' storage
   offsets: CUDA and CPU allocations are both at least 16-byte aligned),
   ints divisible by 16, ints equal to 1 made constants, ``do_not_specialize``
   honoured; and compiles it with ``triton.compile(ASTSource(...),
   target=GPUTarget('cuda', arch, 32))``, no GPU needed;
3. reads the SASS with the ``cuobjdump`` Triton bundles and counts, per
   kernel variant: registers, spills, shared memory, tensor-core
   instructions (HMMA/HGMMA), global load widths, cp.async (LDGSTS) and TMA
   use, barriers, and warp instructions, weighted by loop trip counts;
4. predicts each kernel's time as max(issue-bound under perfect issue,
   tensor-core-bound, DRAM-bound, ``KERNEL_FLOOR_US``) on the target
   (``GPUS``): a lower bound; adds the layer's 1x1 projection
   (a GEMM) and the eager PyTorch work the backend does around its kernels,
   and puts the layer, forward + backward, beside a modelled cuDNN 3x3
   convolution of the same shape.

How instructions are counted. A SASS loop is a backward branch; its body
is every instruction between the branch target and the branch. Its trip
count comes from the TTGIR of the same compile: the ``scf.for`` loops there
are matched to the SASS loops by nesting and order (loops with a constant
trip count of at most ``UNROLLED_TRIPS`` that have no SASS loop are taken
as unrolled by LLVM; a childless loop that ptxas unrolled by k shows as a
main loop and a remainder loop, k from their sizes: trips // k and
trips % k), and each ``scf.for``'s bounds are evaluated from the launch's
int arguments and the constants of the IR (averaged over the grid's
programs when they depend on the program id). An instruction counts
once per iteration of every loop around it. Conditional code is counted as
if executed (an upper bound: e.g. the masked-off tail of a border tile);
a loop that cannot be matched, or whose bounds cannot be evaluated (they
depend on an enclosing loop's variable, or on loaded data), counts its
body once and is reported as unresolved. Warp instructions per
output pixel = per-warp count x warps x programs / (batch x H x W); all
heads are included.

Bytes: "compulsory" bytes move every tensor a kernel receives once (what a
kernel with perfect reuse in L2 would read or write from DRAM); "requested"
bytes are what the SASS's global loads and stores ask for (32 lanes x
width, masks ignored: an upper bound of L1 traffic).

Exit status: 0 when every kernel compiles, else 1. The targets
are printed as met or not met; they do not change the exit status.
"""
import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional
from unittest import mock

TOOL_DIR = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(TOOL_DIR))

# --------------------------------------------------------------------------
# The hardware and the convolution the model compares against.

# Peak figures of the SXM parts (NVIDIA data sheets); clocks are the boost
# clocks a long kernel sustains, about.
GPUS = {
    90: dict(name='H100 SXM', sms=132, clock_ghz=1.75, warp_issue_per_clock=4,
             dram_tb_s=3.35, tensor_tflops_bf16=989.0, shared_kb=228, regs=65536,
             max_warps=64),
    80: dict(name='A100 SXM 80GB', sms=108, clock_ghz=1.41, warp_issue_per_clock=4,
             dram_tb_s=2.04, tensor_tflops_bf16=312.0, shared_kb=164, regs=65536,
             max_warps=64),
}
# Fraction of the tensor-core peak cuDNN's 3x3 convolution (and cuBLAS's
# projection GEMM) reaches at these shapes: an assumption, to be replaced by
# tools/gpu_check.sh's measurement.
GEMM_EFFICIENCY = 0.65
# Fraction of the DRAM bandwidth a streaming kernel reaches.
DRAM_EFFICIENCY = 0.85
# The least time any kernel takes in a stream of launches (launch gap and
# tail), about: a floor under every kernel of the layer and of the conv.
KERNEL_FLOOR_US = 3.0

# Layer shapes (channels, height, width) of the SASA models at a 640x640
# image, batch 8 (tools/benchmark.py's 'resnet50-640' and 'fpn-head-640'
# presets): the ResNet-50 stages' spatial layer at their resolution (the
# first block of stages 2-4 runs it at twice the resolution, then pools),
# the FPN outputs and head towers at 256 channels on P3..P7.
SHAPES = [
    ('layer1', 64, 160, 160), ('layer2', 128, 80, 80), ('layer3', 256, 40, 40),
    ('layer4', 512, 20, 20), ('P3', 256, 80, 80), ('P4', 256, 40, 40), ('P5', 256, 20, 20),
    ('P6', 256, 10, 10), ('P7', 256, 5, 5),
]
BATCH = 8
HEADS = 8
WINDOW = 7
UNROLLED_TRIPS = 16
# The layer's input, and the q, k, v its projection writes for the kernels.
MEMORY_FORMATS = {
    'contiguous': 'contiguous (q, k, v channels-last where the head width is a multiple of 8, '
                  'as the layer projects them for the Triton kernels; otherwise planar)',
    'channels_last': 'channels-last (q, k, v channels-last at those widths)',
    'planar': "contiguous, with the layer's planar projection forced (planar q, k, v, read "
              'element by element: what head widths that are not multiples of 8 run)',
}

# Issue 19's targets.
TARGET_RATIO = {8: 3.0}  # head width -> max (attention fwd+bwd) / (conv fwd+bwd)
TARGET_RATIO_DEFAULT = 1.5  # head widths >= 16
TARGET_FEWER_INSTRUCTIONS = 10.0


def flipped_width(width: int) -> int:
    """A width of the other divisibility by 16, close to ``width``."""
    return width + 4 if width % 16 == 0 else 16 * math.ceil(width / 16)


# --------------------------------------------------------------------------
# 1. Capturing the launches.


def import_package(source_root: Optional[str]):
    """Import sasa_mmdet from ``source_root`` (default: this checkout)."""
    if os.environ.get('TRITON_INTERPRET', '0') == '1':
        raise RuntimeError('TRITON_INTERPRET=1 is set: the kernels would be interpreted, not '
                           'compiled; unset it before running this tool')
    root = osp.abspath(source_root or ROOT)
    for name in [m for m in sys.modules if m == 'sasa_mmdet' or m.startswith('sasa_mmdet.')]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        package = importlib.import_module('sasa_mmdet')
    finally:
        sys.path.remove(root)
    if not osp.abspath(package.__file__).startswith(root + os.sep):
        raise RuntimeError(f'imported sasa_mmdet from {package.__file__}, not from {root}')
    return package


class LaunchRecorder:
    """While active, Triton kernel launches are recorded, not run.

    ``launches`` gets one dict per launch: the JIT function, its positional
    and keyword arguments (tensors kept alive until :meth:`specialise`),
    the grid as launched, and the phase ('forward' or 'backward': which of
    the backend's entry points was running, None outside them).
    """

    def __init__(self, backend_module) -> None:
        self.backend = backend_module
        self.launches: List[dict] = []
        self.phase: Optional[str] = None
        self.eager_bytes = {'forward': 0, 'backward': 0}
        self.eager_ops = {'forward': 0, 'backward': 0}

    @contextlib.contextmanager
    def active(self, phase: str):
        """Record launches; ``phase`` names them unless they come from the
        backend's ``forward`` or ``backward`` (which set their own)."""
        from triton.runtime import autotuner
        from triton.runtime.jit import JITFunction
        recorder = self
        saved = JITFunction.run, autotuner.Autotuner.run
        patched_entry = {}

        def run(fn, *args, grid, warmup=False, **kwargs):
            recorder.launches.append(dict(fn=fn, args=args, kwargs=kwargs, grid=grid,
                                          phase=recorder.phase))

        def autotuned_run(tuner, *args, **kwargs):
            # No GPU to time the configs on: the first one is compiled.
            config = tuner.configs[0]
            return tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()})

        for entry_phase in ('forward', 'backward'):
            entry = getattr(self.backend, entry_phase, None)
            if entry is not None:
                patched_entry[entry_phase] = entry
                setattr(self.backend, entry_phase, self._in_phase(entry_phase, entry))
        JITFunction.run, autotuner.Autotuner.run = run, autotuned_run
        self.phase = phase
        try:
            yield self
        finally:
            self.phase = None
            JITFunction.run, autotuner.Autotuner.run = saved
            for entry_phase, entry in patched_entry.items():
                setattr(self.backend, entry_phase, entry)

    def _in_phase(self, phase, entry):
        """``entry`` run with the phase set and its eager PyTorch work counted."""
        from torch.utils._python_dispatch import TorchDispatchMode
        recorder = self

        class CountBytes(TorchDispatchMode):
            """DRAM bytes of the eager ops the backend runs itself (inputs and
            outputs of every op that is not a view or an allocation)."""

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not func.is_view and not func.__name__.startswith(NO_TRAFFIC_OPS):
                    touched = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()):
                               t.numel() * t.element_size()
                               for t in _tensors((args, kwargs, out))}
                    recorder.eager_bytes[phase] += sum(touched.values())
                    recorder.eager_ops[phase] += 1
                return out

        def wrapped(*args, **kwargs):
            outer, recorder.phase = recorder.phase, phase
            try:
                with CountBytes():
                    return entry(*args, **kwargs)
            finally:
                recorder.phase = outer

        return wrapped

    def specialise(self, archs) -> List[dict]:
        """Each launch as Triton would compile it for each arch, and its
        arguments' description; the tensors are released."""
        records = []
        for launch in self.launches:
            record = dict(phase=launch['phase'], kernel=launch['fn'].__name__,
                          fn=launch['fn'], args=describe_args(launch), compile={})
            for arch in archs:
                record['compile'][arch] = specialise_launch(launch, arch)
            record['grid'] = launch_grid(launch, record['compile'][archs[0]]['bound'])
            for spec in record['compile'].values():
                spec.pop('bound')
            records.append(record)
        self.launches = []
        return records


# Aten ops that move no data (allocations, views, metadata).
NO_TRAFFIC_OPS = ('empty', 'new_empty', 'as_strided', 'detach', 'alias', 'lift', 'view',
                  '_local_scalar_dense', 'set_', 'resize_')


def _tensors(tree):
    import torch
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def specialise_launch(launch: dict, arch: int) -> dict:
    """Signature, constants, attributes and options of ``launch`` compiled
    for ``sm_<arch>``: Triton's own binder and argument packing (as in
    ``JITFunction.run``) with the CUDA backend of that target."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch['fn']
    kwargs = dict(launch['kwargs'])
    kwargs['debug'] = kwargs.get('debug', fn.debug) or knobs.runtime.debug
    kwargs['instrumentation_mode'] = knobs.compilation.instrumentation_mode
    backend = make_backend(GPUTarget('cuda', arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch['args'], **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return dict(signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                bound=bound)


def specialised_names(fn, spec: dict) -> List[str]:
    """Names of the arguments marked divisible by 16 (pointers: 16-byte
    aligned) in a specialisation."""
    return sorted(fn.params[path[0]].name for path, attrs in spec['attrs'].items()
                  if any(a[0] == 'tt.divisibility' for a in attrs))


def launch_grid(launch: dict, bound: dict) -> tuple:
    grid = launch['grid']
    if callable(grid):
        grid = grid(bound)
    grid = tuple(int(g) for g in grid)
    return grid + (1, ) * (3 - len(grid))


def describe_args(launch: dict) -> Dict[str, dict]:
    """Name -> tensor (shape, strides, dtype, bytes, 16-byte aligned) or value."""
    import torch
    fn = launch['fn']
    names = [p.name for p in fn.params]
    values = dict(zip(names, launch['args']))
    values.update({k: v for k, v in launch['kwargs'].items() if k in names})
    described = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            described[name] = dict(
                shape=list(value.shape), stride=list(value.stride()), dtype=str(value.dtype),
                bytes=value.numel() * value.element_size(),
                aligned_16=value.storage_offset() * value.element_size() % 16 == 0,
                storage=value.untyped_storage().data_ptr(),
                offset=value.storage_offset() * value.element_size())
        elif isinstance(value, (bool, int, float, str)) or value is None:
            described[name] = dict(value=value)
        else:
            described[name] = dict(value=repr(value))
    return described


def record_launches(layer, x, backend_module, resolvers: Dict[object, str],
                    dtype: str = 'bfloat16', archs=(90, )):
    """Every Triton launch of one forward and backward pass of ``layer`` on
    ``x`` (CPU tensors), specialised for each arch.

    ``resolvers`` maps each module whose backend resolver refuses CPU
    tensors outside the interpreter to that resolver's name; for the call,
    the resolver answers 'triton' when asked for it (and defers to itself
    otherwise), so nothing runs on the tensors but the layer's PyTorch ops
    and the backend's own. Launches are named 'forward' or 'backward' by
    the pass they come from (or by ``backend_module``'s ``forward`` and
    ``backward`` entry points when it has them).

    Returns:
        tuple: as :func:`layer_launches`.
    """
    import torch
    recorder = LaunchRecorder(backend_module)
    saved = {module: getattr(module, name) for module, name in resolvers.items()}

    def on_cpu(resolve):
        def resolve_on_cpu(impl, device, *args, **kwargs):
            if impl == 'triton':
                return 'triton'
            return resolve(impl, device, *args, **kwargs)
        return resolve_on_cpu

    for module, name in resolvers.items():
        setattr(module, name, on_cpu(saved[module]))
    autocast = torch.autocast('cpu', dtype=getattr(torch, dtype), enabled=dtype != 'float32')
    try:
        with recorder.active('forward'), autocast:
            out = layer(x)
        with recorder.active('backward'):
            # a gradient in the output's layout, as the next layer would give
            out.backward(torch.ones_like(out))
    finally:
        for module, name in resolvers.items():
            setattr(module, name, saved[module])
    if not recorder.launches:
        raise RuntimeError('the layer launched no Triton kernel: is impl="triton" honoured?')
    eager = {phase: dict(bytes=recorder.eager_bytes[phase], ops=recorder.eager_ops[phase])
             for phase in recorder.eager_bytes}
    return recorder.specialise(list(archs)), eager


def layer_launches(package, channels: int, height: int, width: int, heads: int = HEADS,
                   batch: int = BATCH, window: int = WINDOW, dtype: str = 'bfloat16',
                   archs=(90, ), layer_options: Optional[dict] = None,
                   memory_format: str = 'contiguous'):
    """Every Triton launch of one forward and backward pass of the layer,
    its input in ``memory_format`` (:data:`MEMORY_FORMATS`).

    The layer runs on CPU tensors: the operator's check that refuses them
    outside the interpreter is lifted for the call, and nothing executes on
    them but the projection and the backend's own PyTorch ops
    (:func:`record_launches`).

    Returns:
        tuple: ``(records, eager)``: one record per launch (kernel, phase,
        grid, arguments, its specialisation per arch) and ``{phase: {bytes,
        ops}}`` of the PyTorch ops the backend runs around its kernels.

    Example:
        >>> records, _ = layer_launches(import_package(None), 128, 12, 16, batch=2)
        >>> sorted({r['phase'] for r in records})
        ['backward', 'forward']
    """
    import torch
    ops = importlib.import_module(package.__name__ + '.layers.local_attention_ops')
    backend = importlib.import_module(package.__name__ + '.layers.backends.triton')
    layer = package.layers.LocalSelfAttention2d(channels, channels, 3, padding=1,
                                                window_size=window, num_heads=heads,
                                                impl='triton', **(layer_options or {}))
    x = torch.zeros(batch, channels, height, width).contiguous(memory_format=dict(
        contiguous=torch.contiguous_format, planar=torch.contiguous_format,
        channels_last=torch.channels_last)[memory_format])
    x.requires_grad_()
    planar = contextlib.nullcontext()
    if memory_format == 'planar':  # the layer's planar projection at any head width
        planar = mock.patch.object(sys.modules[type(layer).__module__],
                                   'channels_last_projection', return_value=False)
    with planar:
        return record_launches(layer, x, backend, {ops: 'resolve_backend'}, dtype=dtype,
                               archs=archs)


# --------------------------------------------------------------------------
# 2. Compiling and reading the SASS.


def nvidia_tool(name: str) -> str:
    import triton
    path = osp.join(osp.dirname(triton.__file__), 'backends', 'nvidia', 'bin', name)
    if not osp.exists(path):
        raise FileNotFoundError(f'{name} not found at {path} (triton without its CUDA tools?)')
    return path


_COMPILED: Dict[str, dict] = {}


def variant_key(fn, arch: int, spec: dict) -> str:
    """A short name of one compiled variant: the kernel, its source, the
    arch and the specialisation."""
    kernel = fn.__name__
    text = repr((kernel, getattr(fn, 'cache_key', ''), arch, sorted(spec['signature'].items()),
                 sorted(spec['constexprs'].items()),
                 sorted((k, repr(v)) for k, v in spec['attrs'].items()), repr(spec['options'])))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def compile_variant(fn, arch: int, spec: dict) -> dict:
    """Compile one specialisation; returns cubin, SASS, TTGIR and metadata
    (cached per variant)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    key = variant_key(fn, arch, spec)
    if key in _COMPILED:
        return _COMPILED[key]
    start = time.time()
    try:
        compiled = triton.compile(ASTSource(fn, spec['signature'], spec['constexprs'],
                                            spec['attrs']),
                                  target=GPUTarget('cuda', arch, 32),
                                  options=spec['options'].__dict__)
    except Exception as error:  # noqa: BLE001  (report every failing variant)
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        summary = lines[0] if lines else ''
        if len(lines) > 1:  # Triton puts the source excerpt between place and cause
            summary += ' ... ' + lines[-1].strip()
        result = dict(key=key, error=f'{type(error).__name__}: {summary}')
        _COMPILED[key] = result
        return result
    cubin = compiled.asm['cubin']
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvidia_tool('cuobjdump'), '-sass', f.name], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([nvidia_tool('cuobjdump'), '-res-usage', f.name],
                               capture_output=True, text=True, check=True).stdout
    match = re.search(r'REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)', usage)
    result = dict(key=key, sass=sass, ttgir=compiled.asm['ttgir'],
                  registers=int(match.group(1)), stack_bytes=int(match.group(2)),
                  local_bytes=int(match.group(4)), shared_bytes=int(compiled.metadata.shared),
                  num_warps=int(compiled.metadata.num_warps),
                  compile_s=round(time.time() - start, 2))
    _COMPILED[key] = result
    return result


_INSTRUCTION = re.compile(r'^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Za-z0-9_.]*)'
                          r'\s*([^;]*);')


def parse_sass(text: str) -> List[dict]:
    """``[{addr, op, operands}]`` of the first function in cuobjdump's text."""
    instructions = []
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            instructions.append(dict(addr=int(match.group(1), 16), op=match.group(3),
                                     operands=match.group(4).strip()))
    return instructions


def sass_loops(instructions: List[dict]) -> List[dict]:
    """Loops as ``{start, end, children}`` trees (backward branches), in
    address order."""
    spans = {}
    for ins in instructions:
        if ins['op'].startswith('BRA'):
            target = re.match(r'(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))', ins['operands'])
            if target and target.group(1):
                dest = int(target.group(1), 16)
                if dest < ins['addr']:
                    spans[dest] = max(spans.get(dest, dest), ins['addr'])
    loops = sorted((dict(start=s, end=e, children=[]) for s, e in spans.items()),
                   key=lambda l: (l['start'], -l['end']))
    roots, stack = [], []
    for loop in loops:
        while stack and not (stack[-1]['start'] <= loop['start']
                             and loop['end'] <= stack[-1]['end']):
            stack.pop()
        (stack[-1]['children'] if stack else roots).append(loop)
        stack.append(loop)
    return roots


_FOR = re.compile(r'scf\.for\s+%[\w.]+\s*=\s*(%[\w.#]+)\s+to\s+(%[\w.#]+)\s+step\s+(%[\w.#]+)')
_DEF = re.compile(r'^\s*(%[\w.]+)(?::\d+)?\s*=\s*(arith\.\w+|tt\.get_program_id|'
                  r'tt\.get_num_programs)\s+(.*)$')
_ARG = re.compile(r'%([\w.]+):\s*[^,()]*?(?:\{[^}]*\})?\s*loc\("([\w.]+)"')
_ARITH = {'arith.addi': lambda a, b: a + b, 'arith.subi': lambda a, b: a - b,
          'arith.muli': lambda a, b: a * b, 'arith.maxsi': max, 'arith.minsi': min,
          'arith.maxui': max, 'arith.minui': min,
          'arith.divsi': lambda a, b: int(a / b), 'arith.divui': lambda a, b: a // b,
          'arith.remsi': lambda a, b: int(math.fmod(a, b)), 'arith.remui': lambda a, b: a % b,
          'arith.ceildivsi': lambda a, b: -(-a // b), 'arith.floordivsi': lambda a, b: a // b,
          'arith.extsi': lambda a: a, 'arith.extui': lambda a: a, 'arith.trunci': lambda a: a,
          'arith.index_cast': lambda a: a}
# Programs sampled (evenly) to average a trip count that depends on the
# program id.
PROGRAM_SAMPLES = 2048


class _NeedsProgramId(Exception):
    pass


def ttgir_loops(ttgir: str, values: Dict[str, object], grid=(1, 1, 1)) -> List[dict]:
    """``scf.for`` trees ``{trips, constant, children}`` of the kernel.

    Trip counts are evaluated from ``values`` (the launch's named int
    arguments) through the IR's integer arithmetic; one that depends on the
    program id is averaged over the programs of ``grid`` (``per_program``
    set); ``trips`` is None when a bound is not computable before the launch
    (e.g. it depends on an enclosing loop's variable or on loaded data).
    """
    lines = ttgir.splitlines()
    defs, env = {}, {}
    for line in lines:
        if 'tt.func public' in line:
            for ssa, name in _ARG.findall(line):
                if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                    env['%' + ssa] = values[name]
        match = _DEF.match(line)
        if match:
            defs[match.group(1)] = (match.group(2), match.group(3))

    def evaluate(name, pid, depth=0):
        """(value or None, constant: computed from IR constants alone)."""
        if name in env:
            return env[name], False
        if depth > 40 or name not in defs:
            return None, False
        op, rest = defs[name]
        if op in ('tt.get_program_id', 'tt.get_num_programs'):
            axis = 'xyz'.index(rest.strip()[0])
            if op == 'tt.get_num_programs':
                return grid[axis], False
            if pid is None:
                raise _NeedsProgramId
            return pid[axis], False
        if op == 'arith.constant':
            number = re.match(r'(-?\d+)\s*:\s*i\d+', rest)
            return (int(number.group(1)), True) if number else (None, False)
        operands = re.findall(r'%[\w.#]+', rest.split(':')[0])
        results = [evaluate(o, pid, depth + 1) for o in operands]
        if op not in _ARITH or any(v is None for v, _ in results):
            return None, False
        try:
            return _ARITH[op](*(v for v, _ in results)), all(c for _, c in results)
        except (TypeError, ZeroDivisionError, ValueError):
            return None, False

    def trip_count(bounds, pid):
        (lb, c1), (ub, c2), (step, c3) = (evaluate(b, pid) for b in bounds)
        if None in (lb, ub, step) or step <= 0:
            return None, False
        return max(0, -(-(ub - lb) // step)), c1 and c2 and c3

    def programs():
        total = grid[0] * grid[1] * grid[2]
        for i in range(0, total, max(1, total // PROGRAM_SAMPLES)):
            yield (i % grid[0], i // grid[0] % grid[1], i // (grid[0] * grid[1]))

    roots, stack, depth = [], [], 0
    for line in lines:
        match = _FOR.search(line)
        if match:
            per_program = False
            try:
                trips, constant = trip_count(match.groups(), None)
            except _NeedsProgramId:
                counts = [trip_count(match.groups(), pid)[0] for pid in programs()]
                trips = None if None in counts else sum(counts) / len(counts)
                constant, per_program = False, True
            loop = dict(trips=trips, constant=constant, per_program=per_program, children=[],
                        depth=depth)
            while stack and stack[-1]['depth'] >= depth:
                stack.pop()
            (stack[-1]['children'] if stack else roots).append(loop)
            stack.append(loop)
        depth += line.count('{') - line.count('}')
        while stack and depth <= stack[-1]['depth']:
            stack.pop()
    return roots


def match_trip_counts(sass_roots, ir_roots) -> bool:
    """Give every SASS loop the trip count of its ``scf.for`` (``trips``;
    None when unresolved). True when every loop was matched and evaluated."""

    def flatten_unrolled(loops):
        out = []
        for loop in loops:
            if loop['constant'] and loop['trips'] is not None and loop['trips'] <= UNROLLED_TRIPS:
                out += flatten_unrolled(loop['children'])
            else:
                out.append(loop)
        return out

    def assign(sass, ir) -> bool:
        if len(ir) != len(sass):
            ir = flatten_unrolled(ir)
        if (len(sass) == 2 * len(ir) and ir
                and not any(loop['children'] for loop in sass + ir)):
            # ptxas unrolled each loop by k: a main loop of k bodies, then
            # a remainder loop of one (k from their sizes).
            ok = True
            for pair, loop in zip(zip(sass[::2], sass[1::2]), ir):
                main, rest = sorted(pair, key=lambda l: l['end'] - l['start'], reverse=True)
                k = max(1, round((main['end'] - main['start'] + 16)
                                 / (rest['end'] - rest['start'] + 16)))
                trips = loop['trips']
                main['trips'] = None if trips is None else trips // k
                rest['trips'] = None if trips is None else trips - k * (trips // k)
                main['unrolled'] = rest['unrolled'] = k
                ok &= trips is not None
            return ok
        if len(ir) != len(sass):
            for loop in sass:
                mark_unresolved(loop)
            return False
        ok = True
        for s, i in zip(sass, ir):
            s['trips'] = i['trips']
            ok &= i['trips'] is not None
            ok &= assign(s['children'], i['children'])
        return ok

    def mark_unresolved(loop):
        loop['trips'] = None
        for child in loop['children']:
            mark_unresolved(child)

    return assign(sass_roots, ir_roots)


def load_bytes(op: str) -> int:
    """Bytes per thread of a global load or store opcode."""
    parts = op.split('.')
    for width, size in (('128', 16), ('64', 8), ('U16', 2), ('S16', 2), ('U8', 1), ('S8', 1)):
        if width in parts:
            return size
    return 4


def mma_flops(op: str) -> int:
    """Floating-point operations of one warp's tensor-core instruction, in
    16-bit-equivalents: a TF32 product counts twice (tensor cores run TF32
    at half their bf16/fp16 rate)."""
    rate = 2 if '.TF32' in op else 1
    match = re.search(r'HGMMA\.(\d+)x(\d+)x(\d+)', op)
    if match:  # a warpgroup's instruction, issued by each of its 4 warps
        m, n, k = (int(g) for g in match.groups())
        return rate * 2 * m * n * k // 4
    match = re.search(r'[HI]MMA\.(\d+)(\d)(\d+)', op)
    if match:  # e.g. HMMA.16816: m16 n8 k16
        digits = match.group(0).split('.')[1]
        shape = {'16816': (16, 8, 16), '1688': (16, 8, 8), '884': (8, 8, 4)}.get(digits)
        if shape:
            return rate * 2 * shape[0] * shape[1] * shape[2]
    return 0


# Instruction classes, by opcode prefix (first match wins).
INSTRUCTION_CLASSES = (
    ('tensor core', ('HGMMA', 'HMMA', 'IMMA', 'WARPGROUP')),
    ('global memory', ('LDG', 'STG', 'RED', 'ATOM', 'UTMA', 'UBLKCP')),
    ('shared memory', ('LDS', 'STS', 'LDSM', 'STSM')),
    ('spill', ('LDL', 'STL')),
    ('float', ('FADD', 'FMUL', 'FFMA', 'FSETP', 'FSEL', 'FMNMX', 'MUFU', 'F2F', 'F2FP',
               'FCHK', 'HADD2', 'HMUL2', 'HFMA2', 'HMNMX2', 'FSWZADD')),
    ('shuffle', ('SHFL', )),
    ('sync and control', ('BAR', 'MEMBAR', 'FENCE', 'WARPSYNC', 'SYNCS', 'DEPBAR', 'BRA',
                          'EXIT', 'BSSY', 'BSYNC', 'ERRBAR', 'CCTL', 'YIELD')),
)


def instruction_class(op: str) -> str:
    """'tensor core', 'global memory', ..., or 'integer and other' (address
    arithmetic, masks, selects, moves, conversions, uniform datapath)."""
    for name, prefixes in INSTRUCTION_CLASSES:
        if op.startswith(prefixes):
            return name
    return 'integer and other'


def analyse_sass(sass: str, ttgir: str, values: Dict[str, object], grid=(1, 1, 1)) -> dict:
    """Instruction counts of one kernel, static and weighted by trip counts
    (per warp and program)."""
    instructions = parse_sass(sass)
    # The last EXIT is followed by a branch-to-self and NOP padding.
    roots = sass_loops(instructions)
    resolved = match_trip_counts(roots, ttgir_loops(ttgir, values, grid))
    flat = []

    def walk(loops, factor):
        for loop in loops:
            trips = loop['trips'] if loop['trips'] is not None else 1
            flat.append((loop['start'], loop['end'], factor * trips, loop))
            walk(loop['children'], factor * trips)

    walk(roots, 1)
    stats = dict(static=0, weighted=0.0, mma=0.0, mma_flops=0.0, mma_static=0, ldg={}, stg={},
                 ld_bytes=0.0, st_bytes=0.0, cp_async=0, tma=0, barriers=0.0,
                 barriers_static=0, spill_ops=0, shared_ops=0.0, mix={})
    for ins in instructions:
        op = ins['op']
        if op == 'NOP' or (op.startswith('BRA') and ins['operands'].startswith(hex(ins['addr']))):
            continue
        weight = 1
        for start, end, factor, _ in flat:
            if start <= ins['addr'] <= end:
                weight = max(weight, factor)
        stats['static'] += 1
        stats['weighted'] += weight
        kind = instruction_class(op)
        stats['mix'][kind] = stats['mix'].get(kind, 0) + weight
        if re.match(r'(HGMMA|HMMA|IMMA|WGMMA)', op):
            stats['mma'] += weight
            stats['mma_static'] += 1
            stats['mma_flops'] += weight * mma_flops(op)
        if op.startswith('LDG'):
            width = f'{load_bytes(op) * 8}-bit'
            stats['ldg'][width] = stats['ldg'].get(width, 0) + 1
            stats['ld_bytes'] += weight * 32 * load_bytes(op)
        if op.startswith(('STG', 'RED', 'ATOM')):
            width = f'{load_bytes(op) * 8}-bit'
            stats['stg'][width] = stats['stg'].get(width, 0) + 1
            stats['st_bytes'] += weight * 32 * load_bytes(op)
        if op.startswith('LDGSTS'):
            stats['cp_async'] += 1
        if op.startswith(('UTMALDG', 'UTMASTG', 'UBLKCP', 'UTMAPF')):
            stats['tma'] += 1
        if op.startswith('BAR'):
            stats['barriers'] += weight
            stats['barriers_static'] += 1
        if op.startswith(('STL', 'LDL')):
            stats['spill_ops'] += 1
        if op.startswith(('LDS', 'STS', 'LDSM')):
            stats['shared_ops'] += weight
    stats['loops'] = [dict(static=(e - s) // 16 + 1, executions=f,
                           **({'unrolled': l['unrolled']} if 'unrolled' in l else {}))
                      for s, e, f, l in flat]
    stats['loops_resolved'] = resolved
    return stats


# --------------------------------------------------------------------------
# 3. The cost model.


def occupancy(gpu: dict, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Programs resident per SM (registers allocated per warp in 256s)."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = gpu['regs'] // (regs_per_warp * num_warps)
    by_shared = (gpu['shared_kb'] * 1024) // max(shared_bytes, 1) if shared_bytes else 32
    by_warps = gpu['max_warps'] // num_warps
    return max(0, min(by_regs, by_shared, by_warps, 32))


def kernel_cost(record: dict, arch: int, compiled: dict, pixels: int) -> dict:
    """One launch's counts per output pixel and predicted time on ``arch``."""
    gpu = GPUS[arch]
    values = {name: a.get('value') for name, a in record['args'].items() if 'value' in a}
    stats = analyse_sass(compiled['sass'], compiled['ttgir'], values, record['grid'])
    warps = compiled['num_warps']
    programs = record['grid'][0] * record['grid'][1] * record['grid'][2]
    per_warp = stats['weighted']
    warp_instructions = per_warp * warps * programs
    # Programs spread evenly over the SMs; an SM issues at most
    # warp_issue_per_clock instructions a clock.
    resident = occupancy(gpu, compiled['registers'], compiled['shared_bytes'], warps)
    per_sm = math.ceil(programs / gpu['sms']) * per_warp * warps
    issue_s = per_sm / (gpu['warp_issue_per_clock'] * gpu['clock_ghz'] * 1e9)
    tensor_s = stats['mma_flops'] * warps * programs / (gpu['tensor_tflops_bf16'] * 1e12)
    # Distinct memory each kernel touches (q, k, v of one buffer counted by
    # their own extents).
    compulsory = sum(a['bytes'] for a in record['args'].values() if 'bytes' in a)
    dram_s = compulsory / (gpu['dram_tb_s'] * 1e12 * DRAM_EFFICIENCY)
    mma_per_pixel = stats['mma'] * warps * programs / pixels
    spec = record['compile'][arch]
    return dict(
        kernel=record['kernel'], phase=record['phase'], variant=compiled['key'],
        divisible_by_16=specialised_names(record['fn'], spec),
        ints_made_constant=[p.name for p in record['fn'].params if not p.is_constexpr
                            and spec['signature'].get(p.name) == 'constexpr'],
        num_stages=spec['options'].num_stages, maxnreg=spec['options'].maxnreg,
        grid=list(record['grid']), programs=programs, num_warps=warps,
        registers=compiled['registers'], spill_bytes=compiled['stack_bytes'],
        spill_instructions=stats['spill_ops'], shared_bytes=compiled['shared_bytes'],
        programs_per_sm=resident, static_instructions=stats['static'],
        loops=stats['loops'], loops_resolved=stats['loops_resolved'],
        warp_instructions_per_pixel=warp_instructions / pixels,
        mix_per_pixel={kind: count * warps * programs / pixels
                       for kind, count in stats['mix'].items()},
        tensor_core_instructions=stats['mma_static'],
        tensor_core_per_pixel=mma_per_pixel,
        global_loads=stats['ldg'], global_stores=stats['stg'],
        widest_load=max((int(w.split('-')[0]) for w in stats['ldg']), default=0),
        cp_async=stats['cp_async'], tma=stats['tma'], barriers_static=stats['barriers_static'],
        barriers_per_pixel=stats['barriers'] * warps * programs / pixels,
        compulsory_bytes_per_pixel=compulsory / pixels,
        requested_bytes_per_pixel=(stats['ld_bytes'] + stats['st_bytes']) * warps * programs
        / pixels,
        issue_us=issue_s * 1e6, tensor_us=tensor_s * 1e6, dram_us=dram_s * 1e6,
        predicted_us=max(issue_s * 1e6, tensor_s * 1e6, dram_s * 1e6, KERNEL_FLOOR_US),
        bound=max((issue_s * 1e6, 'issue'), (tensor_s * 1e6, 'tensor'), (dram_s * 1e6, 'dram'),
                  (KERNEL_FLOOR_US, 'floor'))[1])


def gemm_us(gpu: dict, flops: float, nbytes: float) -> float:
    """One GEMM-like kernel: its FLOPs at GEMM_EFFICIENCY of the tensor-core
    peak or its bytes at DRAM_EFFICIENCY, whichever is longer, at least
    KERNEL_FLOOR_US."""
    return max(flops / (gpu['tensor_tflops_bf16'] * 1e12 * GEMM_EFFICIENCY) * 1e6,
               nbytes / (gpu['dram_tb_s'] * 1e12 * DRAM_EFFICIENCY) * 1e6, KERNEL_FLOOR_US)


def conv_model(arch: int, channels: int, height: int, width: int, batch: int,
               itemsize: int = 2) -> dict:
    """cuDNN's 3x3 convolution, forward (y = conv(x)) and backward (dx and
    dw, one kernel each), each as :func:`gemm_us`."""
    gpu = GPUS[arch]
    pixels = batch * height * width
    flops = 2 * pixels * 9 * channels * channels
    act = pixels * channels * itemsize
    forward = gemm_us(gpu, flops, 2 * act)
    backward = gemm_us(gpu, flops, 3 * act) + gemm_us(gpu, flops, 2 * act)
    return dict(forward_us=forward, backward_us=backward, total_us=forward + backward,
                flops_per_pixel=flops / pixels)


def projection_model(arch: int, channels: int, pixels: int, itemsize: int = 2) -> dict:
    """The layer's 1x1 q/k/v projection (a GEMM, 3C x C per pixel), forward
    and backward (input and weight gradients), modelled like the convolution."""
    gpu = GPUS[arch]
    flops = 2 * pixels * 3 * channels * channels
    act = pixels * channels * itemsize
    forward = gemm_us(gpu, flops, 4 * act)
    backward = gemm_us(gpu, flops, 4 * act) + gemm_us(gpu, flops, 4 * act)
    return dict(forward_us=forward, backward_us=backward)


def model_shape(package, name: str, channels: int, height: int, width: int, archs,
                dump: Optional[str] = None, heads: int = HEADS, batch: int = BATCH,
                memory_format: str = 'contiguous') -> dict:
    """The cost model of one layer shape on every arch, the layer's input
    in ``memory_format`` (:data:`MEMORY_FORMATS`)."""
    records, eager = layer_launches(package, channels, height, width, heads=heads,
                                    batch=batch, archs=archs, memory_format=memory_format)
    pixels = batch * height * width
    row = dict(name=name, channels=channels, height=height, width=width, heads=heads,
               head_dim=channels // heads, batch=batch, window=WINDOW, dtype='bfloat16',
               memory_format=memory_format,
               eager_bytes_per_pixel={k: v['bytes'] / pixels for k, v in eager.items()},
               eager_ops={k: v['ops'] for k, v in eager.items()}, archs={})
    for arch in archs:
        gpu = GPUS[arch]
        kernels, errors = [], []
        for record in records:
            compiled = compile_variant(record['fn'], arch, record['compile'][arch])
            if 'error' in compiled:
                errors.append(dict(kernel=record['kernel'], error=compiled['error']))
                continue
            kernels.append(kernel_cost(record, arch, compiled, pixels))
            if dump:
                write_sass(dump, arch, record, compiled)
        projection = projection_model(arch, channels, pixels)
        conv = conv_model(arch, channels, height, width, batch)
        phases = {}
        for phase in ('forward', 'backward'):
            mine = [k for k in kernels if k['phase'] == phase]
            eager_us = max(eager[phase]['bytes'] / (gpu['dram_tb_s'] * 1e12 * DRAM_EFFICIENCY)
                           * 1e6, eager[phase]['ops'] * KERNEL_FLOOR_US)
            phases[phase] = dict(
                kernels_us=sum(k['predicted_us'] for k in mine), eager_us=eager_us,
                projection_us=projection[f'{phase}_us'],
                warp_instructions_per_pixel=sum(k['warp_instructions_per_pixel'] for k in mine),
                tensor_core_per_pixel=sum(k['tensor_core_per_pixel'] for k in mine),
                tensor_cores_in_every_kernel=bool(mine) and all(
                    k['tensor_core_instructions'] > 0 for k in mine))
            phases[phase]['layer_us'] = (phases[phase]['kernels_us'] + eager_us
                                         + projection[f'{phase}_us'])
        total = phases['forward']['layer_us'] + phases['backward']['layer_us']
        # The same layer with every kernel at its DRAM (or launch) floor:
        # what no faster kernel code can beat without moving fewer bytes.
        floor = total - sum(k['predicted_us'] for k in kernels) + sum(
            max(k['dram_us'], KERNEL_FLOOR_US) for k in kernels)
        row['archs'][arch] = dict(
            gpu=gpu['name'], kernels=kernels, errors=errors, forward=phases['forward'],
            backward=phases['backward'], layer_us=total, conv=conv,
            ratio_to_conv=total / conv['total_us'], floor_us=floor,
            floor_ratio_to_conv=floor / conv['total_us'],
            warp_instructions_per_pixel=sum(p['warp_instructions_per_pixel']
                                            for p in phases.values()),
            no_spills=all(k['spill_bytes'] == 0 and k['spill_instructions'] == 0
                          for k in kernels))
    return row


def write_sass(folder: str, arch: int, record: dict, compiled: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    path = osp.join(folder, f'sm{arch}_{record["kernel"]}_{compiled["key"]}.sass')
    if osp.exists(path):
        return
    spec = record['compile'][arch]
    with open(path, 'w') as f:
        f.write(f'// {record["kernel"]} for sm_{arch}\n// signature: {spec["signature"]}\n'
                f'// constants: {spec["constexprs"]}\n// attributes: {spec["attrs"]}\n'
                f'// options: num_warps={spec["options"].num_warps} '
                f'num_stages={spec["options"].num_stages} maxnreg={spec["options"].maxnreg}\n')
        f.write(compiled['sass'])


# --------------------------------------------------------------------------
# 4. Reporting.


def check_targets(rows: List[dict], legacy: Optional[dict], arch: int = 90) -> List[dict]:
    """Issue 19's targets on ``arch``, each ``{target, met, detail}``."""
    results = []
    ratios = []
    for row in rows:
        entry = row['archs'].get(arch)
        if entry is None:
            continue
        limit = TARGET_RATIO.get(row['head_dim'], TARGET_RATIO_DEFAULT)
        ratios.append((row, entry['ratio_to_conv'], limit))
    if ratios:
        worst = max(ratios, key=lambda r: r[1] / r[2])
        results.append(dict(
            target='fwd+bwd <= 1.5x the modelled conv (head width >= 16), <= 3x (width 8)',
            met=all(r <= limit for _, r, limit in ratios),
            detail=f"worst {worst[1]:.2f}x at {shape_label(worst[0])} (limit {worst[2]}x)"))
    if legacy:
        factors = []
        for row in rows:
            old = legacy_row(legacy, row, arch)
            if old and arch in row['archs']:
                factors.append((row, old['warp_instructions_per_pixel']
                                / row['archs'][arch]['warp_instructions_per_pixel']))
        if factors:
            worst = min(factors, key=lambda f: f[1])
            results.append(dict(
                target=f'>= {TARGET_FEWER_INSTRUCTIONS:.0f}x fewer warp instructions per pixel '
                'than the legacy kernels',
                met=all(f >= TARGET_FEWER_INSTRUCTIONS for _, f in factors),
                detail=f'least {worst[1]:.1f}x at {shape_label(worst[0])}'))
    kernels = [k for row in rows for k in row['archs'].get(arch, {}).get('kernels', [])]
    names = {}
    for k in kernels:
        names.setdefault((k['phase'], k['kernel']), []).append(k['tensor_core_instructions'] > 0)
    results.append(dict(
        target='tensor-core instructions in the forward and every backward kernel',
        met=bool(names) and all(all(v) for v in names.values())
        and any(p == 'forward' for p, _ in names) and any(p == 'backward' for p, _ in names),
        detail=', '.join(f'{p} {n}: {"yes" if all(v) else "no"}' for (p, n), v in names.items())))
    return results


def shape_label(row: dict) -> str:
    return f"{row['name']} C={row['channels']} {row['height']}x{row['width']}"


def legacy_row(legacy: dict, row: dict, arch: int) -> Optional[dict]:
    for old in legacy.get('rows', []):
        if (old['channels'], old['height'], old['width']) == (row['channels'], row['height'],
                                                               row['width']):
            return old['archs'].get(str(arch)) or old['archs'].get(arch)
    return None


def print_table(rows: List[dict], archs, legacy: Optional[dict]) -> None:
    for arch in archs:
        gpu = GPUS[arch]
        print(f"\n== sm_{arch}: {gpu['name']}, {gpu['sms']} SMs x {gpu['clock_ghz']} GHz x "
              f"{gpu['warp_issue_per_clock']} warp instr/clk, {gpu['dram_tb_s']} TB/s DRAM "
              f"(x{DRAM_EFFICIENCY}), {gpu['tensor_tflops_bf16']:.0f} TFLOP/s bf16 dense; "
              f"conv and projection GEMMs at {GEMM_EFFICIENCY:.0%} of peak ==")
        print('Per kernel variant (one row per launch; per pixel = per output pixel, all heads):')
        print(f"{'shape':<26} {'kernel':<22} {'regs':>4} {'spill':>5} {'smem':>6} {'TC':>3} "
              f"{'TC/px':>6} {'LDG':>6} {'cpA':>3} {'TMA':>3} {'BAR':>3} {'loops':>5} "
              f"{'instr/px':>9} {'B/px':>6} {'pred us':>8} {'bound':>6}")
        for row in rows:
            for k in row['archs'][arch]['kernels']:
                print(f"{shape_label(row):<26} {k['kernel'][:22]:<22} {k['registers']:>4} "
                      f"{k['spill_bytes']:>5} {k['shared_bytes']:>6} "
                      f"{k['tensor_core_instructions']:>3} {k['tensor_core_per_pixel']:>6.1f} "
                      f"{k['widest_load']:>6} {k['cp_async']:>3} {k['tma']:>3} "
                      f"{k['barriers_static']:>3} {'ok' if k['loops_resolved'] else 'UNRES':>5} "
                      f"{k['warp_instructions_per_pixel']:>9.0f} "
                      f"{k['compulsory_bytes_per_pixel']:>6.0f} {k['predicted_us']:>8.1f} "
                      f"{k['bound']:>6}")
            for error in row['archs'][arch]['errors']:
                print(f"{shape_label(row):<26} {error['kernel'][:22]:<22} COMPILE ERROR: "
                      f"{error['error']}")
        print('\nPer layer, forward + backward (us; layer = projection GEMM + kernels + eager '
              'PyTorch ops in the backend):')
        legacy_note = ' legacy instr/px = recorded figure of the kernels before the redesign' \
            if legacy else ''
        print(f"{'shape':<26} {'D':>3} {'instr/px fwd':>12} {'bwd':>7} {'legacy':>7} "
              f"{'fewer':>6} {'kern fwd':>8} {'kern bwd':>8} {'layer':>7} {'conv':>7} "
              f"{'x conv':>7} {'limit':>5} {'floor x':>7}")
        for row in rows:
            entry = row['archs'][arch]
            old = legacy_row(legacy, row, arch) if legacy else None
            old_px = old['warp_instructions_per_pixel'] if old else None
            fewer = old_px / entry['warp_instructions_per_pixel'] if old_px else None
            limit = TARGET_RATIO.get(row['head_dim'], TARGET_RATIO_DEFAULT)
            print(f"{shape_label(row):<26} {row['head_dim']:>3} "
                  f"{entry['forward']['warp_instructions_per_pixel']:>12.0f} "
                  f"{entry['backward']['warp_instructions_per_pixel']:>7.0f} "
                  f"{(f'{old_px:.0f}' if old_px else '-'):>7} "
                  f"{(f'{fewer:.1f}x' if fewer else '-'):>6} "
                  f"{entry['forward']['kernels_us']:>8.1f} {entry['backward']['kernels_us']:>8.1f} "
                  f"{entry['layer_us']:>7.1f} {entry['conv']['total_us']:>7.1f} "
                  f"{entry['ratio_to_conv']:>7.2f} {limit:>5} "
                  f"{entry['floor_ratio_to_conv']:>7.2f}")
        print('floor x: the layer with every attention kernel at its DRAM (or launch) floor, '
              '/ conv')
        if legacy_note:
            print(legacy_note + f" ({legacy.get('source', 'legacy JSON')})")
        print('\nTargets, sm_%d:' % arch)
        for t in check_targets(rows, legacy, arch):
            print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['detail']}")


def markdown_report(rows: List[dict], archs, legacy: Optional[dict],
                    detail_shapes=((256, 80, 80), (256, 80, 84))) -> str:
    """The layer table per arch (legacy beside), the kernels at
    ``detail_shapes`` and the targets, as Markdown."""
    lines = []
    for arch in archs:
        gpu = GPUS[arch]
        lines += [f"### sm_{arch} ({gpu['name']})", '',
                  f"Assumed: {gpu['sms']} SMs at {gpu['clock_ghz']} GHz issuing "
                  f"{gpu['warp_issue_per_clock']} warp instructions a clock, "
                  f"{gpu['dram_tb_s']} TB/s DRAM at {DRAM_EFFICIENCY:.0%}, "
                  f"{gpu['tensor_tflops_bf16']:.0f} TFLOP/s dense bf16 tensor cores; the "
                  f"convolution and the layer's projection GEMM at {GEMM_EFFICIENCY:.0%} of "
                  f"that; every kernel at least {KERNEL_FLOOR_US:.0f} us. Batch "
                  f"{rows[0]['batch'] if rows else BATCH}, bf16, window {WINDOW}, "
                  f"{HEADS} heads; times are forward + backward.", '',
                  '| layer (C, H x W) | head width | warp instr / pixel: legacy | new (fwd + bwd) '
                  '| fewer | tensor-core instr / pixel | max regs | spills | attention kernels us '
                  '| layer us | conv us | layer / conv | target | DRAM floor / conv |',
                  '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: '
                  '| ---: | --- | ---: |']
        for row in rows:
            entry = row['archs'].get(arch)
            if entry is None:
                continue
            old = legacy_row(legacy, row, arch) if legacy else None
            new_px = entry['warp_instructions_per_pixel']
            old_px = old['warp_instructions_per_pixel'] if old else None
            limit = TARGET_RATIO.get(row['head_dim'], TARGET_RATIO_DEFAULT)
            kernels = entry['kernels']
            tensor_px = (entry['forward']['tensor_core_per_pixel']
                         + entry['backward']['tensor_core_per_pixel'])
            lines.append(
                f"| {row['name']} ({row['channels']}, {row['height']} x {row['width']}) "
                f"| {row['head_dim']} | {f'{old_px:,.0f}' if old_px else '-'} "
                f"| {new_px:,.0f} ({entry['forward']['warp_instructions_per_pixel']:,.0f} + "
                f"{entry['backward']['warp_instructions_per_pixel']:,.0f}) "
                f"| {f'{old_px / new_px:.1f}x' if old_px else '-'} "
                f"| {tensor_px:.0f} "
                f"| {max((k['registers'] for k in kernels), default=0)} "
                f"| {max((k['spill_bytes'] for k in kernels), default=0)} B "
                f"| {entry['forward']['kernels_us'] + entry['backward']['kernels_us']:.0f} "
                f"| {entry['layer_us']:.0f} | {entry['conv']['total_us']:.0f} "
                f"| {entry['ratio_to_conv']:.2f} "
                f"| {'met' if entry['ratio_to_conv'] <= limit else 'not met'} (<= {limit}) "
                f"| {entry['floor_ratio_to_conv']:.2f} |")
        lines += ['', 'DRAM floor: the layer with every attention kernel at the time its '
                  'bytes take (or the launch floor): the projection GEMM, the bytes the kernels '
                  'must move and the number of launches, which no faster kernel code changes.']
        if legacy:
            lines += ['', 'Legacy: the recorded figures of the kernels before the redesign '
                      f"(commit {(legacy.get('kernel_source') or {}).get('commit', '?')}, "
                      '`docs/benchmarks/gpu_cost_model-legacy.json`).']
        lines += ['', f'Kernels at {", ".join("C=%d %dx%d" % s for s in detail_shapes)} '
                  f'(sm_{arch}):', '',
                  '| shape | kernel | warps | programs / SM | regs | spills | shared KB '
                  '| tensor-core instr | widest load | cp.async / TMA | barriers | loops '
                  '| warp instr / pixel | bytes / pixel | predicted us (bound) |',
                  '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: '
                  '| --- | ---: | ---: | --- |']
        for row in rows:
            if (row['channels'], row['height'], row['width']) not in detail_shapes:
                continue
            for k in row['archs'].get(arch, {}).get('kernels', []):
                lines.append(
                    f"| {row['height']}x{row['width']} | {k['phase']} `{k['kernel']}` "
                    f"| {k['num_warps']} | {k['programs_per_sm']} | {k['registers']} "
                    f"| {k['spill_bytes']} B "
                    f"| {k['shared_bytes'] / 1024:.0f} | {k['tensor_core_instructions']} "
                    f"| {k['widest_load']}-bit | {k['cp_async']} / {k['tma']} "
                    f"| {k['barriers_static']} "
                    f"| {'resolved' if k['loops_resolved'] else 'UNRESOLVED'} "
                    f"| {k['warp_instructions_per_pixel']:,.0f} "
                    f"| {k['compulsory_bytes_per_pixel']:,.0f} "
                    f"| {k['predicted_us']:.0f} ({k['bound']}) |")
        kinds = ['tensor core', 'float', 'integer and other', 'global memory', 'shared memory',
                 'spill', 'shuffle', 'sync and control']
        lines += ['', f'Where the warp instructions per pixel go (sm_{arch}):', '',
                  '| shape | kernel | ' + ' | '.join(kinds) + ' |',
                  '| --- | --- |' + ' ---: |' * len(kinds)]
        for row in rows:
            if (row['channels'], row['height'], row['width']) not in detail_shapes:
                continue
            for k in row['archs'].get(arch, {}).get('kernels', []):
                mix = k.get('mix_per_pixel', {})
                lines.append(f"| {row['height']}x{row['width']} | `{k['kernel']}` | "
                             + ' | '.join(f"{mix.get(kind, 0):,.0f}" for kind in kinds) + ' |')
        lines += ['', f'Targets on sm_{arch}:', '']
        for t in check_targets(rows, legacy, arch):
            lines.append(f"- **{'met' if t['met'] else 'not met'}**: {t['target']} "
                         f"({t['detail']})")
        lines.append('')
    return '\n'.join(lines)


def plot(rows: List[dict], legacy: Optional[dict], path: str, arch: int = 90) -> bool:
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no PNG')
        return False
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = [shape_label(r) for r in rows if arch in r['archs']]
    series = [('attention layer (model)', [r['archs'][arch]['layer_us'] for r in rows
                                           if arch in r['archs']]),
              ('cuDNN 3x3 conv (model)', [r['archs'][arch]['conv']['total_us'] for r in rows
                                          if arch in r['archs']])]
    if legacy:
        olds = [legacy_row(legacy, r, arch) for r in rows if arch in r['archs']]
        if all(olds):
            series.insert(0, ('legacy kernels (model)', [o['layer_us'] for o in olds]))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.35 * len(labels) * len(series)))
    bar = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        ax.barh([j + (i - (len(series) - 1) / 2) * bar for j in range(len(labels))], values,
                height=bar, label=name)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale('log')
    ax.set_xlabel(f'predicted forward + backward time, us (sm_{arch}, {GPUS[arch]["name"]}, '
                  f'bf16, batch {BATCH})')
    ax.legend(fontsize=8)
    ax.grid(axis='x', which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def kernel_source(package) -> dict:
    """Which kernels were modelled: the checkout's commit, whether the
    backend file differs from it, and the file's hash."""
    path = osp.join(osp.dirname(package.__file__), 'layers', 'backends', 'triton.py')
    with open(path, 'rb') as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    root = osp.dirname(osp.dirname(package.__file__))

    def git(*args):
        result = subprocess.run(['git', '-C', root, *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else None

    return dict(commit=git('rev-parse', '--short', 'HEAD'),
                backend_modified=bool(git('status', '--porcelain', '--', path)),
                backend_sha1=digest)


def _strip(rows):
    """JSON-ready rows (arch keys as strings)."""
    return json.loads(json.dumps(rows, default=str))


def parse_shapes(values) -> List[tuple]:
    shapes = []
    for value in values:
        try:
            channels, height, width = (int(v) for v in value.split(','))
        except ValueError:
            raise argparse.ArgumentTypeError(f'--shapes takes C,H,W triples, got {value!r}')
        if min(channels, height, width) <= 0 or channels % HEADS:
            raise argparse.ArgumentTypeError(
                f'--shapes: C, H, W must be positive and C divisible by {HEADS} heads, got '
                f'{value!r}')
        shapes.append((f'C{channels}', channels, height, width))
    return shapes


# --------------------------------------------------------------------------
# 5. Calibration: the model beside a GPU's measurements.


def calibrate(model_path: str, benchmark_paths: List[str], out_dir: str,
              arch: int = 90) -> List[dict]:
    """Put tools/benchmark.py's CUDA layer times (bfloat16, Triton) beside
    this model's predictions for the same shapes and batch; writes
    ``calibration.json`` and ``calibration.md`` in ``out_dir``.

    Each row: measured and predicted time of the layer (forward +
    backward) and of cuDNN's 3x3 convolution, measured / predicted for
    both, and the attention / convolution ratio measured and predicted.
    Needs neither triton nor a GPU (tools/gpu_check.sh runs it).
    """
    with open(model_path) as f:
        modelled = json.load(f)
    predicted = {}
    for row in modelled['rows']:
        entry = row['archs'].get(str(arch)) or row['archs'].get(arch)
        if entry:
            predicted[(row['channels'], row['height'], row['width'], row['batch'])] = entry
    measured, meta = [], {}
    for path in benchmark_paths:
        with open(path) as f:
            bench = json.load(f)
        meta = meta or bench.get('meta', {})
        measured += [r for r in bench['rows'] if r.get('kind') == 'layer'
                     and r.get('dtype') == 'bfloat16' and str(r.get('impl', '')).startswith(
                         'triton') and 'time_s' in r]
    rows = []
    for r in measured:
        key = (*r['shape'], r['batch'])
        entry = predicted.get(key)
        if entry is None:
            continue
        layer_us, conv_us = r['time_s'] * 1e6, r['conv_time_s'] * 1e6
        rows.append(dict(
            shape=list(r['shape']), batch=r['batch'], measured_us=layer_us,
            predicted_us=entry['layer_us'], measured_over_predicted=layer_us / entry['layer_us'],
            conv_measured_us=conv_us, conv_predicted_us=entry['conv']['total_us'],
            conv_measured_over_predicted=conv_us / entry['conv']['total_us'],
            ratio_to_conv_measured=layer_us / conv_us,
            ratio_to_conv_predicted=entry['ratio_to_conv']))
    rows.sort(key=lambda r: (r['shape'], r['batch']))
    here = osp.join(ROOT, 'sasa_mmdet', 'layers', 'backends', 'triton.py')
    current = None
    if osp.exists(here):
        with open(here, 'rb') as f:
            current = hashlib.sha1(f.read()).hexdigest()[:12]
    modelled_sha = (modelled.get('kernel_source') or {}).get('backend_sha1')
    notes = [f"GPU: {meta.get('gpu', 'unknown')} (the model's figures are for sm_{arch}, "
             f"{GPUS[arch]['name']}); triton {meta.get('triton', '?')} measured, "
             f"{modelled.get('triton', '?')} modelled."]
    if current and modelled_sha and current != modelled_sha:
        notes.append(f'The kernels changed since the model was made (backend sha1 {current}, '
                     f'modelled {modelled_sha}): rerun gpu_cost_model.py for a current '
                     'prediction.')
    if not rows:
        notes.append('No measured shape matches a modelled one (bfloat16 Triton rows, same '
                     'C, H, W and batch).')
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, 'calibration.json'), 'w') as f:
        json.dump(dict(meta=meta, model=osp.relpath(model_path, ROOT), arch=arch, notes=notes,
                       rows=rows), f, indent=1)
    lines = ['# Cost model beside the GPU', '', *notes, '',
             '| C, H, W (batch) | layer measured us | predicted us | measured / predicted '
             '| conv measured us | conv predicted us | conv measured / predicted '
             '| layer / conv measured | predicted |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        lines.append(
            f"| {', '.join(str(v) for v in r['shape'])} ({r['batch']}) | {r['measured_us']:.0f} "
            f"| {r['predicted_us']:.0f} | {r['measured_over_predicted']:.2f} "
            f"| {r['conv_measured_us']:.0f} | {r['conv_predicted_us']:.0f} "
            f"| {r['conv_measured_over_predicted']:.2f} | {r['ratio_to_conv_measured']:.2f} "
            f"| {r['ratio_to_conv_predicted']:.2f} |")
    with open(osp.join(out_dir, 'calibration.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[90, 80], choices=sorted(GPUS),
                        help='compute capabilities to compile for (default: 90 80)')
    parser.add_argument('--shapes', nargs='+', metavar='C,H,W',
                        help='layer shapes of your own (default: the ResNet-50/FPN/head '
                        'shapes at 640, batch 8)')
    parser.add_argument('--no-flip', action='store_true',
                        help='only the given widths (by default each shape is also modelled '
                        'with W changed to the other divisibility by 16)')
    parser.add_argument('--batch', type=int, default=BATCH)
    parser.add_argument('--memory-format', choices=list(MEMORY_FORMATS), default='contiguous',
                        help="the layer's input: " + '; '.join(
                            f'{name}: {what}' for name, what in MEMORY_FORMATS.items()))
    parser.add_argument('--json', help='write the rows as JSON to this file')
    parser.add_argument('--png', help='bar chart of predicted layer vs conv time (sm_90)')
    parser.add_argument('--markdown', help='write the tables and targets as Markdown here')
    parser.add_argument('--dump', metavar='DIR', help='write the SASS of each kernel variant here')
    parser.add_argument('--legacy', default=osp.join(ROOT, 'docs', 'benchmarks',
                                                     'gpu_cost_model-legacy.json'),
                        help='JSON of the kernels before the redesign, printed beside '
                        "(default: docs/benchmarks/gpu_cost_model-legacy.json; 'none' to skip)")
    parser.add_argument('--source-root', help='the checkout whose sasa_mmdet is modelled '
                        '(default: this one)')
    parser.add_argument('--calibrate', nargs='+', metavar='BENCHMARK_JSON',
                        help="instead of modelling: put tools/benchmark.py's CUDA results "
                        'beside the model JSON (--model-json) and write calibration.md/.json '
                        'to --out')
    parser.add_argument('--model-json', default=osp.join(ROOT, 'docs', 'benchmarks',
                                                         'gpu_cost_model.json'),
                        help='with --calibrate: the predictions (default: '
                        'docs/benchmarks/gpu_cost_model.json)')
    parser.add_argument('--out', default='.', help='with --calibrate: output folder')
    args = parser.parse_args(argv)
    if args.calibrate:
        missing = [p for p in [args.model_json, *args.calibrate] if not osp.exists(p)]
        if missing:
            parser.error(f'--calibrate: no such file: {missing}')
        calibrate(args.model_json, args.calibrate, args.out)
        return 0
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else list(SHAPES)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.batch < 1:
        parser.error(f'--batch must be positive, got {args.batch}')
    legacy = None
    if args.legacy and args.legacy != 'none' and osp.exists(args.legacy):
        with open(args.legacy) as f:
            legacy = json.load(f)

    import triton
    package = import_package(args.source_root)
    cases = []
    for name, channels, height, width in shapes:
        cases.append((name, channels, height, width))
        if not args.no_flip:
            cases.append((name, channels, height, flipped_width(width)))
    rows, start = [], time.time()
    print(f'triton {triton.__version__}, sasa_mmdet from {osp.dirname(package.__file__)}: '
          f'{len(cases)} layer shapes x sm_{args.arch}', flush=True)
    for name, channels, height, width in cases:
        rows.append(model_shape(package, name, channels, height, width, args.arch,
                                dump=args.dump, batch=args.batch,
                                memory_format=args.memory_format))
        print(f'  {shape_label(rows[-1])}: {len(rows[-1]["archs"][args.arch[0]]["kernels"])} '
              f'launches ({time.time() - start:.0f} s)', flush=True)
    rows = _strip(rows)
    for row in rows:  # back to int keys for the report
        row['archs'] = {int(k): v for k, v in row['archs'].items()}
    print_table(rows, args.arch, legacy)
    targets = {arch: check_targets(rows, legacy, arch) for arch in args.arch}
    errors = [e for r in rows for a in r['archs'].values() for e in a['errors']]
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(
                triton=triton.__version__, kernel_source=kernel_source(package),
                source='this checkout' if args.source_root is None else
                f"checkout of commit {kernel_source(package)['commit']}",
                assumptions=dict(gpus=GPUS, gemm_efficiency=GEMM_EFFICIENCY,
                                 dram_efficiency=DRAM_EFFICIENCY, batch=args.batch,
                                 heads=HEADS, window=WINDOW, dtype='bfloat16',
                                 memory_format=args.memory_format),
                targets={str(a): t for a, t in targets.items()}, rows=rows), f, indent=1)
        print(f'wrote {args.json}')
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(markdown_report(rows, args.arch, legacy))
        print(f'wrote {args.markdown}')
    if args.png and plot(rows, legacy, args.png, arch=90 if 90 in args.arch else args.arch[0]):
        print(f'wrote {args.png}')
    return 1 if errors else 0


if __name__ == '__main__':
    os.environ.pop('TRITON_INTERPRET', None)  # compile for GPUs, never interpret
    sys.exit(main())
