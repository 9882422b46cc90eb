"""``ponderlm serve``: the OpenAI-compatible HTTP API (``api``), the model's own process
(``engine``) and the continuous-batching scheduler that admits and steps requests (``scheduler``)."""
