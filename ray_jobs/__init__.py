"""Ray drivers: one module per pipeline stage, the stage registry, planning and the pipeline runner.

Each stage is declared once in :mod:`ray_jobs.registry` (name, description, settings, what it reads and
writes, its module); :func:`ray_jobs.pipeline.run` runs a spec's stages with every check ``diclip run``
makes. Stage modules are imported only when a stage runs, so ``diclip --help`` stays fast.
"""
