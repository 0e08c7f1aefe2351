"""Stage gguf-export: pack.method's integers as one GGUF file for llama.cpp, checked by the
gguf package's dequantizer and scored through transformers.

    python stages/gguf_export.py pack.method=awq_gptq

Body: :mod:`ptqflow.pipeline.gguf_export`.
"""

from _hydra import stage_main

from ptqflow.pipeline import gguf_export

main = stage_main(gguf_export.run)

if __name__ == "__main__":
    main()
