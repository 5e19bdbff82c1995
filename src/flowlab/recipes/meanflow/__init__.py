"""The MeanFlow recipe (``recipe: meanflow``): :mod:`.config` (light, validated first) and :mod:`.recipe`."""
