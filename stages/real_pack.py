"""Stage real-pack: quantize to integers and write an HF-style checkpoint directory.

    python stages/real_pack.py pack=compressed_tensors

Body: :mod:`ptqflow.pipeline.real_pack`.
"""

from _hydra import stage_main

from ptqflow.pipeline import real_pack

main = stage_main(real_pack.run)

if __name__ == "__main__":
    main()
