"""NeMo-Run entrypoints: ``nemo llm import|export …`` (registered through the ``nemo_run.cli``
entry-point group in pyproject.toml). They are the very functions ``pare <command>`` calls."""

import nemo_run as run

from pare_nemo.cli import COMMANDS, resolve

for _name in COMMANDS:
    run.cli.entrypoint(name=_name, namespace="llm", skip_confirmation=True)(resolve(_name))
