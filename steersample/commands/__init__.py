"""Sub-commands of the ``steersample`` CLI (see ``steersample.cli``)."""
