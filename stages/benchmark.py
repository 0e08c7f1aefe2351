"""Stage benchmark: kernel, end-to-end decode and checkpoint-size figures of the packed model.

    python stages/benchmark.py bench.m=[1,16]

Body: :mod:`ptqflow.pipeline.benchmark`.
"""

from _hydra import stage_main

from ptqflow.pipeline import benchmark

main = stage_main(benchmark.run)

if __name__ == "__main__":
    main()
