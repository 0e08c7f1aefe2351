"""Search benchmark (not a DVC stage): seconds per block, total and peak RSS of the real
scale-search and clip-search stages, each in a fresh process.

    python stages/bench_search.py                 # w4g64
    python stages/bench_search.py quant=w3g64

Body: :mod:`ptqflow.pipeline.bench_search`.
"""

from _hydra import stage_main

from ptqflow.pipeline import bench_search

main = stage_main(bench_search.run)

if __name__ == "__main__":
    main()
