"""Online RL fine-tuning of flow models: DiffusionNFT (``recipe: nft``) and FlowGRPO (``recipe: flowgrpo``).

* :mod:`flowlab.nft.policy` -- the trained model with its old (rollout) policy and reference (full or LoRA);
* :mod:`flowlab.nft.sd3` -- Stable Diffusion 3 pipelines as policies (LoRA on the transformer);
* :mod:`flowlab.nft.advantages` -- group advantages and DiffusionNFT's optimality probabilities;
* :mod:`flowlab.nft.losses` -- the two methods' losses as pure functions;
* :mod:`flowlab.nft.recipe` -- the recipes and their config sections (``rl``, ``nft``, ``grpo``);
* :mod:`flowlab.nft.quality` -- reward-hacking guards on digits (FD to the target class, diversity).
"""
from __future__ import annotations

import importlib

# Names are imported on first use, so that the light ``config`` module of this package (read when a
# config is validated) does not import torch.
_LAZY = {
    "Advantages": "advantages",
    "group_advantages": "advantages",
    "optimality_probability": "advantages",
    "grpo_loss": "losses",
    "implicit_policies": "losses",
    "nft_loss": "losses",
    "FlowPolicy": "policy",
    "LoraSpec": "policy",
    "Policy": "policy",
}

__all__ = ["Advantages", "group_advantages", "optimality_probability", "grpo_loss", "implicit_policies", "nft_loss", "FlowPolicy", "LoraSpec", "Policy"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
