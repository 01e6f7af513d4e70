"""Backends of the local-attention operator (see ``local_attention_ops``).

One file per implementation of the same function, all held to
``reference.local_attention_reference`` by the tests:

- ``reference``: unfolds the window (obviously correct, slow);
- ``pytorch``: plain PyTorch, offset by offset, any device; its forward is
  also the export path (standard ONNX operators only);
- ``cpu``: the compiled C++ kernel (``csrc/local_attention_cpu.cpp``);
- ``triton``: fused Triton kernels for CUDA (and CPU tensors under
  ``TRITON_INTERPRET=1``).
"""
