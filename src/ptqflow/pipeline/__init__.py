"""The pipeline's stages as library functions.

Each stage module has ``run(cfg, run=None) -> dict``: ``cfg`` is the composed config as plain
Python types (Hydra's, or ``params.yaml``), ``run`` a :class:`~ptqflow.pipeline.common.StageRun`
(project root, script, sweep job). :mod:`ptqflow.pipeline.table` says what every stage reads and
writes; ``dvc.yaml`` is generated from it (:mod:`ptqflow.pipeline.dag`). The scripts under
``stages/`` only compose the config and call ``run``.
"""
