"""A vision-language model as judge, over an OpenAI-compatible chat endpoint.

UnifiedReward (and any VLM) is served by sglang or vLLM behind ``POST <base>/v1/chat/completions``.
For each image, :class:`VLMJudgeReward` sends one request, as the reference does
(``unifiedreward_score_sglang`` in ``flow_grpo/rewards.py``, lines 284-358 in yifan123/flow_grpo,
179-253 in NVlabs/DiffusionNFT)::

    {"model": "<model>", "temperature": 0, "max_tokens": <max_tokens>,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,<PNG>"}},
         {"type": "text", "text": <template with {prompt} filled in>}]}]}

and reads ``choices[0].message.content`` of the answer. The score is the first match of
``pattern`` (a regular expression with one group; default ``Final Score:\\s*([0-9]+(?:\\.[0-9]+)?)``)
divided by ``max_score`` (5), so the default gives UnifiedReward's 1-5 rating as 0.2-1.
Images are resized to ``resize`` x ``resize`` (512, as the reference) before PNG encoding.

Differences from the reference, on purpose: a reply without a parseable score is NaN (the
sample is dropped and counted in :attr:`info` ``num_unparsed``) rather than 0, which would
punish a sample for the judge's formatting; requests go through flowlab's HTTP client with
timeouts and bounded retries (:class:`~flowlab.rewards.remote.HTTPClient`), ``concurrency`` at a
time, instead of an unbounded ``asyncio.gather``.
"""
from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image
from torch import Tensor

from flowlab.rewards.base import OptionError, RewardFunction, register_reward
from flowlab.rewards.imaging import to_pil
from flowlab.rewards.remote import AttemptError, HTTPClient, parse_json_answer

__all__ = ["VLMJudgeReward", "UNIFIEDREWARD_TEMPLATE", "DEFAULT_PATTERN", "parse_score"]

UNIFIEDREWARD_TEMPLATE = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to evaluate this "
    "image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the provided "
    "caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, color "
    "accuracy, and overall aesthetic appeal.\nBased on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]"
)
"""The reference's UnifiedReward question (``flow_grpo/rewards.py`` line 315 in yifan123/flow_grpo)."""

DEFAULT_PATTERN = r"Final Score:\s*([0-9]+(?:\.[0-9]+)?)"


def parse_score(text: str, pattern: re.Pattern) -> float | None:
    """The number captured by the first match of ``pattern`` in ``text``, or ``None``."""
    m = pattern.search(text)
    if m is None:
        return None
    try:
        return float(m.group(1))
    except (IndexError, ValueError):
        return None


def _chat_content(raw: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions answer (text, or a list of text parts)."""
    data = parse_json_answer(raw)
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise AttemptError(f"the answer has no choices[0].message.content (got {str(data)[:160]!r})") from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise AttemptError(f"choices[0].message.content is a {type(content).__name__}, expected text")
    return content


@register_reward("vlm_judge")
class VLMJudgeReward(RewardFunction):
    """Scores each image by asking a VLM behind an OpenAI-compatible endpoint (module docstring).

    Args:
        url: the server's base URL (``http://127.0.0.1:17140/v1`` in the reference) or the full
            ``.../chat/completions`` URL.
        model: the served model name (``UnifiedReward-7b-v1.5`` in the reference).
        template: the question; ``{prompt}`` is replaced by the image's prompt.
        pattern: regular expression whose first group is the score.
        max_score: the score is divided by it (5 for UnifiedReward).
        resize: side the images are resized to before sending (0: as they are).
        max_tokens: reply length cap.
        concurrency: requests in flight at once.
        api_key: sent as ``Authorization: Bearer <api_key>`` when given.
        timeout: seconds per connection/read.
        retries: extra attempts after a failure.
        backoff: first wait between attempts in seconds, doubled each retry.
        backoff_max: cap of one wait.
    """

    def __init__(
        self,
        *,
        url: str,
        model: str,
        template: str = UNIFIEDREWARD_TEMPLATE,
        pattern: str = DEFAULT_PATTERN,
        max_score: float = 5.0,
        resize: int = 512,
        max_tokens: int = 512,
        concurrency: int = 8,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
    ):
        super().__init__()
        endpoint = url.rstrip("/")
        if not endpoint.endswith("/chat/completions"):
            endpoint += "/chat/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.client = HTTPClient(endpoint, timeout=timeout, retries=retries, backoff=backoff, backoff_max=backoff_max, headers=headers)
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise OptionError("pattern", f"not a regular expression: {e}") from None
        if self.pattern.groups < 1:
            raise OptionError("pattern", f"needs one group capturing the number, e.g. {DEFAULT_PATTERN!r}")
        if "{prompt}" not in template:
            raise OptionError("template", "must contain {prompt}")
        if not max_score > 0:
            raise OptionError("max_score", f"must be positive, got {max_score}")
        for name, value, low in (("resize", resize, 0), ("max_tokens", max_tokens, 1), ("concurrency", concurrency, 1)):
            if value < low:
                raise OptionError(name, f"must be >= {low}, got {value}")
        self.url = endpoint
        self.model = model
        self.template = template
        self.max_score = max_score
        self.resize = resize
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.last_replies: list[str] = []

    def image_url(self, image: Image.Image) -> str:
        """The image as a ``data:image/png;base64,...`` URL, resized to ``resize`` x ``resize``."""
        if self.resize:
            image = image.resize((self.resize, self.resize), Image.BICUBIC)
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def request(self, image: Image.Image, prompt: str) -> dict[str, Any]:
        """The chat-completions request body for one image."""
        question = self.template.replace("{prompt}", prompt)
        content = [{"type": "image_url", "image_url": {"url": self.image_url(image)}}, {"type": "text", "text": question}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": self.max_tokens}

    def _ask(self, image: Image.Image, prompt: str) -> str:
        body = json.dumps(self.request(image, prompt)).encode("utf-8")
        return self.client.post(body, _chat_content)

    def score(self, images: Tensor, prompts: list[str] | None, metadata: Any) -> tuple[list[float | None], dict[str, Any]]:
        if prompts is None:
            raise ValueError("reward 'vlm_judge' asks about each image's prompt and needs prompts (got None)")
        pil = to_pil(images)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(pil))) as pool:
            replies = list(pool.map(self._ask, pil, prompts))
        values = [parse_score(r, self.pattern) for r in replies]
        self.last_replies = replies
        scores = [None if v is None else v / self.max_score for v in values]
        return scores, {"num_unparsed": sum(v is None for v in values)}

    def __repr__(self) -> str:
        return f"VLMJudgeReward(url={self.url!r}, model={self.model!r})"
