"""Stage report: every recorded result on one Markdown page, with figures and plot tables.

    python stages/report.py

Body: :mod:`ptqflow.pipeline.report`.
"""

from _hydra import stage_main

from ptqflow.pipeline import report

main = stage_main(report.run)

if __name__ == "__main__":
    main()
