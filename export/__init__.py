"""The export stage: fuse the LoRA, export ONNX with optimum, optimise, prove parity, publish (later issue)."""
