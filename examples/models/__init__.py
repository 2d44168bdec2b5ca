"""Reference AR video models, one per family, each reproducing that family's KV-cache idioms
(docs/design.md §5) at its real dimensions with random weights: ``self_forcing``, ``longcat``,
``worldplay``, ``magi``. Each module has ``tiny_config()``, ``real_config()``, the model and
``generate(model, num_chunks, seed, ...)``."""
