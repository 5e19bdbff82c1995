"""Reward models for online RL fine-tuning: ``reward(images, prompts, metadata) -> scores``.

``images`` are float ``(N, C, H, W)`` in ``[0, 1]`` (C = 1 or 3), ``prompts`` a list of N
strings or None, ``metadata`` a list of N dicts or None; the scores are a float32 CPU tensor
``(N,)`` with NaN for samples that could not be scored. Build rewards from config specs::

    reward = build_reward({"name": "digits_classifier", "target": 3}, key="rl.rewards[0]")
    reward = build_rewards([{"name": "pickscore", "weight": 1.0}, {"name": "aesthetic", "head": "...", "weight": 0.5}])

Built-in rewards (``REWARDS``): ``jpeg_compressibility``, ``jpeg_incompressibility``,
``digits_classifier``, ``clip_score``, ``pickscore``, ``aesthetic``, ``http``, ``python``,
``geneval``, ``ocr``, ``hpsv2``, ``imagereward``, ``vlm_judge`` (the last four need optional
extras or a server: see their modules). Several rewards combine with weights after per-reward
z-scoring, or as the reference's raw weighted sum (:class:`CombinedReward`, :func:`combine_scores`);
:class:`AsyncReward` overlaps slow rewards with training; ``python -m flowlab.rewards.server``
serves any reward over HTTP. See ``docs/rewards.md``.
"""
from flowlab.rewards.base import (
    REWARDS,
    OptionError,
    RewardError,
    RewardFunction,
    build_reward,
    build_rewards,
    coerce_scores,
    register_reward,
)
from flowlab.rewards.combined import COMBINE_MODES, CombinedReward, combine_scores, zscore
from flowlab.rewards.asynchronous import AsyncReward

# built-ins register themselves on import (their heavy dependencies load lazily)
from flowlab.rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb
from flowlab.rewards.digits import DigitsClassifierReward
from flowlab.rewards.clip import AestheticMLP, AestheticReward, CLIPScoreReward, PickScoreReward, load_aesthetic_head
from flowlab.rewards.remote import HTTPReward
from flowlab.rewards.function import PythonReward, import_callable
from flowlab.rewards.geneval import GenEvalReward
from flowlab.rewards.ocr import OCRReward
from flowlab.rewards.hps import HPSv2Reward
from flowlab.rewards.imagereward import ImageRewardReward
from flowlab.rewards.vlm import VLMJudgeReward

__all__ = [
    "REWARDS",
    "RewardFunction",
    "RewardError",
    "OptionError",
    "register_reward",
    "build_reward",
    "build_rewards",
    "coerce_scores",
    "CombinedReward",
    "zscore",
    "combine_scores",
    "COMBINE_MODES",
    "AsyncReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "jpeg_size_kb",
    "DigitsClassifierReward",
    "CLIPScoreReward",
    "PickScoreReward",
    "AestheticReward",
    "AestheticMLP",
    "load_aesthetic_head",
    "HTTPReward",
    "PythonReward",
    "import_callable",
    "GenEvalReward",
    "OCRReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "VLMJudgeReward",
]
