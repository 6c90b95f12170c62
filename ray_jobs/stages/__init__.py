"""The pipeline's stages, one module each: what is particular to a stage (its items, its actor or task,
its finalize). What a stage is - name, inputs, output, staleness - is declared in :mod:`ray_jobs.registry`."""
