"""Reusable pieces for learner plugins: the conv4 network as a pure function of a parameter dict
(``conv4``: the MAML family, vmapped over tasks), stacks of pooled conv blocks with running-statistics batch
norm over many episodes at once (``convblocks``: the metric learners), and a whole training step captured in
a CUDA graph (``graphs``)."""
