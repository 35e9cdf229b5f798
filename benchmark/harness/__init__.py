"""The harness: everything between a command line and a finished run directory.

``settings`` (run settings and their defaults) -> ``plan`` (a typed, validated run plan) -> ``runner``
(training, validation, evaluation; ``preflight`` checks the learner first) -> ``rundir`` (the run directory,
written atomically and read back by the reporting layer). ``plugins`` discovers learners and papers,
``protocol`` owns the episodes, ``runtime`` the device, ``provenance`` what every run records, ``execute``
runs plans one after another. Plugin authors never import from here.
"""
