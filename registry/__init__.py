"""Model registry: versions, aliases, lineage, artifacts, promotion gates.

No Ray here. The registry arrives with its own issue; this subpackage exists so
that the import layout (``flywheel.registry``) is fixed from the start.
"""

__all__: list[str] = []
