"""Import the reference's released files (zwyang6/DiCLIP): a ``DiCLIP_model.state_dict()`` checkpoint and
a ``(keys, values)`` KV cache, read weights-only, become a diclip export (``evaluate``/``infer``) and a cache
the ``train`` stage starts from. ``diclip import-release`` is the command; see :mod:`.importer`."""
from diclip.release.importer import import_release

__all__ = ["import_release"]
