"""Checkpoint directories: written atomically, read only after they are checked.

``files`` writes and reads the directory (``model.safetensors``, ``state.pt``, ``meta.json``);
``plain`` keeps ``state.pt`` loadable with ``torch.load(weights_only=True)``; ``rng`` captures
and restores every random number generator. The Trainer (``ember.trainer.checkpoint``) and the
Accelerator (``ember.accelerator.checkpointing``) decide *what* goes in; this package decides
*how* it is written.
"""
