"""Stage gptq: GPTQ's rounding, block by block (resumable).

    python stages/gptq.py quant=w3g64 gptq.act_order=true

Body: :mod:`ptqflow.pipeline.gptq_search`.
"""

from _hydra import stage_main

from ptqflow.pipeline import gptq_search

main = stage_main(gptq_search.run_gptq)

if __name__ == "__main__":
    main()
