"""What every stage runs on: the actor pool and watchdog (common), lineage and staleness, interrupts,
fault wording, the record of recoveries, and every use of Ray's private API or error text (ray_compat)."""
