"""One adapter per diffusers model family, shared by RL policies and WGF sampling.

* :class:`FamilyAdapter` (:mod:`.base`): the protocol (cached prompt encoding, velocity in flowlab
  time, CFG or guidance embedding, unpacked latents and decoding, LoRA in the family's layout).
* :class:`SD3Adapter` (:mod:`.sd3`): Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``).
* :class:`FluxAdapter` (:mod:`.flux`): FLUX.1 dev / schnell (``FluxPipeline``).
* :class:`UNetAdapter` (:mod:`.unet`): SD1.5 / SD2.1 / SDXL (``UNet2DConditionModel``).

``load_family(name, base, ...)`` opens a pipeline folder or Hub id by family name (:data:`FAMILIES`).
"""
from __future__ import annotations

from typing import Any

__all__ = ["FamilyAdapter", "SD3Adapter", "FluxAdapter", "UNetAdapter", "FAMILIES", "load_family"]

#: family name -> (module, adapter class name)
FAMILIES = {"sd3": (".sd3", "SD3Adapter"), "flux": (".flux", "FluxAdapter"), "sd_unet": (".unet", "UNetAdapter")}


def load_family(name: str, base: str, key: str = "base", **kwargs: Any):
    """The adapter of family ``name`` (``sd3``, ``flux``, ``sd_unet``) for the pipeline ``base`` (``from_pretrained``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return __getattr__(FAMILIES[name][1]).from_pretrained(base, key=key, **kwargs)


def __getattr__(name: str):  # keep diffusers' pipelines out of `import flowlab.families`
    import importlib

    if name == "FamilyAdapter":
        from .base import FamilyAdapter

        return FamilyAdapter
    for module, cls in FAMILIES.values():
        if name == cls:
            return getattr(importlib.import_module(module, __name__), cls)
    raise AttributeError(f"module 'flowlab.families' has no attribute {name!r}")
