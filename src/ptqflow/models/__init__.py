"""Models: where they come from (:mod:`ptqflow.models.source`: resolution, integrity checks,
fingerprints), how they load (:mod:`ptqflow.models.loading`), and what each architecture looks
like to the quantizer (:mod:`ptqflow.models.architectures`)."""

from ptqflow.models.architectures import (
    Architecture,
    ScaleGroup,
    get_architecture,
    supported_model_types,
)
from ptqflow.models.loading import (
    auto_class,
    linear_layers,
    linear_shapes,
    load_config,
    load_model,
    load_tokenizer,
    skeleton,
)
from ptqflow.models.source import (
    ModelRef,
    check_safetensors_complete,
    check_weight_files,
    checkpoint_dir,
    model_fingerprint,
    resolve_model,
)

__all__ = [
    "Architecture",
    "ModelRef",
    "ScaleGroup",
    "auto_class",
    "check_safetensors_complete",
    "checkpoint_dir",
    "check_weight_files",
    "get_architecture",
    "linear_layers",
    "linear_shapes",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "resolve_model",
    "skeleton",
    "supported_model_types",
]
