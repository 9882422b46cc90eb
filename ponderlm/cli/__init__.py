"""The ``ponderlm`` command line: ``main`` parses and dispatches; each verb group's arguments and
handler live in a module of their own."""
