"""Re-export: Stable Diffusion 3 as an RL policy (``rl.pipeline: sd3``).

SD3 is a model family like the others now: :class:`flowlab.families.SD3Adapter` (prompt encoding and
its cache, the transformer's velocity in flowlab time, CFG, float32 VAE decoding, LoRA layout) and
:class:`flowlab.nft.family_policy.SD3Policy` (the RL policy over it). ``from flowlab.nft.sd3 import
SD3Policy`` keeps working, with the same ``from_pretrained`` arguments, checkpoint keys and saved files.
"""
from .family_policy import SD3Policy

__all__ = ["SD3Policy"]
