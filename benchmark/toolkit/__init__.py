"""Reusable pieces for learner plugins: the conv4 network as a pure function (``conv4``) and a whole
training step captured in a CUDA graph (``benchmark.toolkit.graphs``)."""
