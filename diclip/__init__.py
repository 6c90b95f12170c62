"""diclip: DiCLIP weakly supervised semantic segmentation as a distributed Ray pipeline.

Importing the package first repairs torchvision's operator registration (see ``_compat``), so every
process that imports diclip - the CLI, tests, Ray Data actors and Ray Train workers - can import
open_clip, transformers and diffusers afterwards.
"""
from diclip._compat import patch_torchvision_ops

patch_torchvision_ops()

__version__ = "0.1.0"
