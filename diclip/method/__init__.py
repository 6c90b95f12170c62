"""The DiCLIP method as pure torch functions: no I/O, no Ray, no model loading.

Modules: ``acr`` (diffusion correlation + attention clustering refinement), ``cam`` (surgery and
cache-retrieval CAMs), ``pseudo`` (CLIP-affinity propagation, RAR random walk, labels), ``losses``,
``par`` (pixel-adaptive refinement), ``resample`` (token-grid maps under crops/flips/rescales),
``codecs`` (compact storage of the RAR attention), ``kmeans``, ``metrics``, ``schedule``.
"""
