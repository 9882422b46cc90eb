"""The transformers integration: the Auto* classes (``modeling``), their lazy registration
(``register``, on top of :mod:`ponderlm._autoregister`, which an install runs in every process),
``ponderlm convert`` from a transformers Llama or GGUF (``convert``) and ``ponderlm export``
(``export``, with its model card ``card`` and the self-contained export's gathered code
``gather``). Importing this package does not import transformers."""
