"""dream-export: DREAM speculative decoding of vision-language models, from PyTorch to TensorRT."""

__version__ = "0.1.0"
