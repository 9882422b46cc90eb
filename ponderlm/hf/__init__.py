"""The transformers integration: the Auto* classes (``modeling``), their lazy registration
(``register``), ``ponderlm convert`` from a transformers Llama or GGUF (``convert``) and
``ponderlm export`` (``export``). Importing this package does not import transformers."""
