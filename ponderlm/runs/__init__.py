"""A training run on disk: its configuration (``config.yaml``: :class:`RunConfig` with its model and
training parts, ``config``), its checkpoint directories (``checkpoint``) and its directory kind. What
reads a run (loading, evaluation, serving, conversion) imports this package, never the trainer."""
