"""The flow-matching recipe (``recipe: flow_matching``): train a velocity model, save a ``FlowPipeline``.

* :mod:`flowlab.recipes.flow_matching.config` -- its config sections (light: no torch);
* :mod:`flowlab.recipes.flow_matching.recipe` -- the recipe itself (imported when a run starts).
"""
