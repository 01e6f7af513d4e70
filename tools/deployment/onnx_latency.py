"""onnxruntime CPU latency of ONNX files, measured side by side in one run.

Each file gets its own ``InferenceSession`` (CPU execution provider, all
graph optimisations; files with ``sasa_mmdet::LocalAttention`` nodes get
the package's custom-op library); after ``--warmup`` runs each, the files
are run in turn, round after round, on the same random input of their own
input shape, so that a change of machine load touches them alike. Prints the
median and the 10th/90th percentiles per file and the ratio of medians to
the first file; ``--json`` also writes them.

The sessions' intra-op threads do not spin-wait (``--spinning`` turns it
back on, onnxruntime's default): a session's threads spin for a while after
each of its runs, so in turn-by-turn runs they take the cores from the next
file's session. Measured on 2 cores: with spinning, one demo attention layer
took 44 ms beside its convolution instead of 5 ms alone; a graph of many
small nodes suffers most, so the ratios would be wrong.

Example::

    python tools/deployment/onnx_latency.py \
        work_dirs/onnx/retinanet_r-tiny_shapes.onnx \
        work_dirs/onnx/retinanet_sasa-tiny_shapes.onnx --repeats 50
"""
import argparse
import json
import os.path as osp
import sys
import time

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='onnxruntime CPU latency of ONNX files, side by side')
    parser.add_argument('files', nargs='+', help='ONNX files (the first is the reference)')
    parser.add_argument('--repeats', type=int, default=50, help='timed runs per file')
    parser.add_argument('--warmup', type=int, default=5, help='untimed runs per file')
    parser.add_argument('--shape', type=int, nargs=2, default=None, metavar=('H', 'W'),
                        help='input H W for files with a dynamic input size '
                        '(default: the static size, else 640 640)')
    parser.add_argument('--threads', type=int, default=0,
                        help='onnxruntime intra-op threads (0: its default)')
    parser.add_argument('--spinning', action='store_true',
                        help="let the sessions' threads spin-wait between runs "
                        "(onnxruntime's default; see the module docstring)")
    parser.add_argument('--json', default=None, help='also write the results here')
    args = parser.parse_args(argv)
    for name in ('repeats', 'warmup'):
        if getattr(args, name) < (1 if name == 'repeats' else 0):
            parser.error(f'--{name} must be >= {1 if name == "repeats" else 0}, '
                         f'got {getattr(args, name)}')
    missing = [f for f in args.files if not osp.isfile(f)]
    if missing:
        parser.error(f'no such ONNX file: {", ".join(missing)}')
    return args


def _uses_custom_ops(path: str) -> bool:
    """Whether the file imports the ``sasa_mmdet`` operator domain."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    return any(imp.domain == 'sasa_mmdet' for imp in model.opset_import)


def _input(session, shape):
    arg = session.get_inputs()[0]
    dims = list(arg.shape)
    fixed = [d if isinstance(d, int) else None for d in dims]
    batch = fixed[0] or 1
    height = fixed[2] or (shape[0] if shape else 640)
    width = fixed[3] or (shape[1] if shape else 640)
    rng = np.random.default_rng(0)
    return arg.name, rng.standard_normal((batch, dims[1], height, width)).astype(np.float32)


def main(argv=None) -> list:
    args = parse_args(argv)
    import onnxruntime as ort

    runs = []
    for path in args.files:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if args.threads:
            options.intra_op_num_threads = args.threads
        options.add_session_config_entry('session.intra_op.allow_spinning',
                                         '1' if args.spinning else '0')
        if _uses_custom_ops(path):
            from sasa_mmdet.deployment import onnxruntime_ops_path
            options.register_custom_ops_library(onnxruntime_ops_path())
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        name, x = _input(session, args.shape)
        for _ in range(args.warmup):
            session.run(None, {name: x})
        runs.append(dict(file=path, session=session, feed={name: x}, times=[]))
    for _ in range(args.repeats):
        for run in runs:
            start = time.perf_counter()
            run['session'].run(None, run['feed'])
            run['times'].append(time.perf_counter() - start)
    results = []
    reference = None
    print(f'onnxruntime {ort.__version__}, CPU, {args.repeats} runs each, interleaved, '
          f'{args.threads or "default"} threads, spinning {"on" if args.spinning else "off"}')
    for run in runs:
        times = np.array(run['times'])
        median = float(np.median(times))
        reference = reference or median
        shape = 'x'.join(str(d) for d in next(iter(run['feed'].values())).shape)
        result = dict(file=run['file'], input_shape=shape, median_s=median,
                      p10_s=float(np.percentile(times, 10)),
                      p90_s=float(np.percentile(times, 90)), ratio=median / reference)
        results.append(result)
        print(f'{run["file"]}  input {shape}  median {median * 1e3:.2f} ms  '
              f'(p10 {result["p10_s"] * 1e3:.2f}, p90 {result["p90_s"] * 1e3:.2f})  '
              f'{result["ratio"]:.2f}x the first')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(onnxruntime=ort.__version__, repeats=args.repeats,
                           threads=args.threads, spinning=args.spinning,
                           results=results), f, indent=2)
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
