"""Torch building blocks shared by the draft (training, reference decoding) and the exporter: attention
ops written for ONNX export and the target's explicit-KV decoder."""
