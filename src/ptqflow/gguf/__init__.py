"""GGUF export: a quantized model as one file llama.cpp runs, built from the integers ptqflow
chose (:mod:`~ptqflow.gguf.export`), in the block types that hold them
(:mod:`~ptqflow.gguf.blocks`), with llama.cpp's architecture keys (:mod:`~ptqflow.gguf.archs`)
and the tokenizer (:mod:`~ptqflow.gguf.vocab`)."""

from ptqflow.gguf.archs import ARCHS, GGUFArch, gguf_arch
from ptqflow.gguf.blocks import BLOCK_TYPES, BlockType, block_type
from ptqflow.gguf.export import GGUFConfig, plan_types, read_back, verify, write_gguf

__all__ = [
    "ARCHS",
    "BLOCK_TYPES",
    "BlockType",
    "GGUFArch",
    "GGUFConfig",
    "block_type",
    "gguf_arch",
    "plan_types",
    "read_back",
    "verify",
    "write_gguf",
]
