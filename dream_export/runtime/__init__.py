"""The light runtime: runs exported bundles with numpy, ONNX Runtime (or TensorRT), tokenizers and Pillow.

Nothing under this package may import torch or transformers: a robotics application that only runs
bundles never installs them.
"""

from dream_export.runtime.chat import ContextLengthError  # noqa: E402
from dream_export.runtime.pipeline import Pipeline, Result, Stream  # noqa: E402

__all__ = ["ContextLengthError", "Pipeline", "Result", "Stream"]
