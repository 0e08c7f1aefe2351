"""Stage calib-data: tokenize the calibration text into blocks (llm-awq's recipe).

    python stages/calib_data.py calib.n_samples=64

Body: :mod:`ptqflow.pipeline.calib_data`.
"""

from _hydra import stage_main

from ptqflow.pipeline import calib_data

main = stage_main(calib_data.run)

if __name__ == "__main__":
    main()
