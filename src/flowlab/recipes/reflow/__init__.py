"""The reflow recipe (``recipe: reflow``): distil a trained ``FlowPipeline`` into a straighter, few-step one.

* :mod:`.config` -- its config sections (light: no torch), validated first;
* :mod:`.pairs` -- the teacher's (noise, label, sample) pairs, generated once and cached in the run folder;
* :mod:`.recipe` -- the recipe itself (imported when a run starts).
"""
