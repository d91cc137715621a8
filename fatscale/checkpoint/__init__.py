"""Checkpoints: what a run saves to continue exactly where it stopped, on any number of ranks.

- ``layout``: the files on disk, their atomic writes, seals (SHA-256 of every file) and pointers
  (``latest``, ``best``); readers that unpickle no code. Imports no torch.
- ``state``: the ``TrainState`` and each rank's RNG states, as saved.
- ``checkpointer``: the ``Checkpointer``, given once the things it saves (DeepSpeed engine, EMA,
  loss scaler, train loader, TrainState, the recipe's identity): when to save, saving, loading,
  resharding ZeRO partitions for another world size.
- ``resume``: may this recipe resume that checkpoint, on this many ranks (identity, batch layout,
  the newest intact checkpoint, what the recipe changed).
- ``cli``: ``python -m fatscale.checkpoint verify OUTPUT_DIR``.
"""
