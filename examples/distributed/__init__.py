"""Parallel versions of the reference models on torch.distributed, with per-rank QVG caches:
``tp_self_forcing`` (tensor parallel), ``ulysses_worldplay`` (Ulysses sequence parallel);
``parallel`` holds the collectives, sharded layers and the process launcher they share."""
