"""Online RL fine-tuning of flow models: DiffusionNFT (``recipe: nft``) and FlowGRPO (``recipe: flowgrpo``).

* :mod:`flowlab.nft.policy` -- the trained model with its old (rollout) policy and reference (full or LoRA);
* :mod:`flowlab.nft.sd3` -- Stable Diffusion 3 pipelines as policies (LoRA on the transformer);
* :mod:`flowlab.nft.advantages` -- group advantages and DiffusionNFT's optimality probabilities;
* :mod:`flowlab.nft.losses` -- the two methods' losses as pure functions;
* :mod:`flowlab.nft.recipe` -- the recipes and their config sections (``rl``, ``nft``, ``grpo``);
* :mod:`flowlab.nft.quality` -- reward-hacking guards on digits (FD to the target class, diversity).
"""
from .advantages import Advantages, group_advantages, optimality_probability
from .losses import grpo_loss, implicit_policies, nft_loss
from .policy import FlowPolicy, LoraSpec, Policy

__all__ = ["Advantages", "group_advantages", "optimality_probability", "grpo_loss", "implicit_policies", "nft_loss", "FlowPolicy", "LoraSpec", "Policy"]
