"""Checkpoint folders: the one shard writer and reader (``folder``), the checks that make an
untrusted folder safe to read (``safetensors_check``, ``files``, ``validate``, ``code_guard``),
digests, atomic and guarded saves (``atomic``, ``save_guard``), the meta-device model
skeleton (``skeleton``) and the tensor names of each model type (``names``).

The exchange formats in :mod:`torchquant.formats` decide what the tensors are; this package
decides how they reach and leave the disk.
"""
