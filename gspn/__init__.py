"""gspn: the project's front door, the ``gspn`` command (``gspn demo``, ``gspn bench``) and the
benchmark runner.

It sits above the three library packages and is imported by none of them:

    gspn_ref   the definition (reference operator, layer, the paper's networks, testing tools)
    gspn_tvm   TVM TensorIR kernels, whole-model compilation with TVM Relax
    export     ONNX export and the ONNX Runtime custom operator

See ``docs/architecture.md``.
"""
