"""The model: configuration, slot layout, layers, KV cache, the one forward for every method, the
exact recurrence, generation, the loss and the FLOPs count. Kept import-light on purpose (no
re-exports): ``from ponderlm import PonderLM`` is the public face."""
