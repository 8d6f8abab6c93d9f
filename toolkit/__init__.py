"""edgekit: train or distill a compact transformer, export it to ONNX, quantize it, run it on CPU, GPU
and NPU runtimes, and prove with a parity harness that every backend computes what PyTorch computes."""

__version__ = "0.1.0"
