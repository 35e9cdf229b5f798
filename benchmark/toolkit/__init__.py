"""Reusable pieces for learner plugins: the conv4 network as a pure function (``conv4``), stacks of pooled
conv blocks with running-statistics batch norm over many episodes at once (``convblocks``), and a whole
training step captured in a CUDA graph (``benchmark.graphs``)."""
