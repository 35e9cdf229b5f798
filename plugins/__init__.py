"""metabench's first-party learners.

Each module is a plugin loaded through the ``bench`` entry-point group, exactly like a third-party one:
``plugins.maml`` (MAML and first-order MAML) and ``plugins.finetune`` (Baseline / Baseline++). The core
(``benchmark``) never imports this package.
"""
