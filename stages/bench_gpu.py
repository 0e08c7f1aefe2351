"""Kernel benchmark against same-run peers (not a DVC stage; meant for a GPU): cuBLAS fp16/bf16,
PyTorch's int4 tinygemm and ptqflow's W4A16 over Llama-7B/8B shapes, M = 1..256.

    python stages/bench_gpu.py          # reports/bench_gpu.json, reports/figures/bench_gpu.png

Body: :mod:`ptqflow.pipeline.bench_gpu`.
"""

from _hydra import stage_main

from ptqflow.pipeline import bench_gpu

main = stage_main(bench_gpu.run)

if __name__ == "__main__":
    main()
