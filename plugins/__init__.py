"""metabench's first-party learners.

Each learner module is a plugin loaded through the ``bench`` entry-point group, exactly like a third-party
one: ``plugins.maml`` (MAML and first-order MAML), ``plugins.anil`` (ANIL), ``plugins.metasgd`` (Meta-SGD),
``plugins.mamlpp`` (MAML++), ``plugins.reptile`` (Reptile) and ``plugins.finetune`` (Baseline / Baseline++).
The gradient-based learners share ``plugins.gradient`` (the vectorized inner loop and meta-gradient),
``plugins.gradient_reference`` (the same as a plain per-task loop) and ``plugins.gradient_learner`` (the
learner machinery and speed switches). The core (``benchmark``) never imports this package.
"""
