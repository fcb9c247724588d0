"""The TensorRT backend, Polygraphy-style: ``settings`` (pure builder settings), ``loaders`` (engine
from ONNX / from bytes / from a file), ``runner`` (``TrtRunner``, ``TrtBackend``), ``kv_cache`` (the
decoder's device-resident cache) and ``cuda`` (cuda-python buffers). tensorrt and cuda-python are
imported only when used: every module here imports without them."""
