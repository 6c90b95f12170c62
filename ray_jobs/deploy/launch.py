"""Entrypoint of submitted jobs: ``<cluster.python> -m ray_jobs.deploy.launch run SPEC ...``.

Why not ``python -m diclip.cli`` directly: the job runs whatever interpreter ``cluster.python`` names on
the cluster, and when that interpreter lacks diclip's dependencies (a cluster started without the venv
active), importing ``diclip`` dies with a ModuleNotFoundError traceback from deep inside torch or
omegaconf. This module imports nothing but the standard library until it hands over to the CLI, so a
missing module becomes one line that names the interpreter and the fix.
"""
from __future__ import annotations

import sys

MISSING_HINT = ("error: {python} on the cluster has no module {module!r}: run the job with an interpreter "
                "that has diclip installed (cluster.python=/path/to/venv/bin/python, e.g. the venv that "
                "started Ray) or install diclip there (pip install -e . / the cluster/Dockerfile image)")


def main(argv: list[str] | None = None) -> int:
    """Run the diclip CLI; a module missing from this interpreter is one line and exit status 2."""
    try:
        from diclip import cli

        return cli.main(argv)
    except ModuleNotFoundError as e:
        print(MISSING_HINT.format(python=sys.executable, module=e.name), file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    sys.exit(main())
