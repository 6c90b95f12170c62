"""Training of the toy models the demo ships (``diclip/resources/toy``), on the toy world
(:mod:`diclip.data.toy_world`: the class is an object's texture).

``pretrain_clip`` and ``pretrain_diffusion`` train a tiny open_clip CLIP and a tiny text-conditioned diffusers
model (VAE + UNet + text encoder); ``pretrain`` (``diclip pretrain-toy``) runs both and ``package``
writes the release with its cards; ``evaluate`` scores models through the pipeline's own code.
"""
