"""ptqflow: reproducible post-training quantization of LLMs (AWQ family) as a DVC DAG.

The library is plain PyTorch + transformers; ``ptqflow.pipeline`` holds the stage bodies that
the Hydra entry points under ``stages/`` call, and :mod:`ptqflow.api` the Python entry point
(``quantize``, ``save``). Nothing here imports Hydra or DVC.
"""

__version__ = "0.1.0"
