"""Sweeps: many ordinary runs (learners x cells x learner options x seeds) on one machine or a Slurm cluster.

``grid`` expands command-line options and a TOML sweep file into grid points; ``plan`` resolves each point
into the ``bench run`` command of one run and its run directory (named by config hash, exactly as
``bench run`` names it); ``record`` keeps ``<out>/sweep.json`` (every run a sweep planned in the folder, the
metabench version, where each run was sent); ``status`` tells per run: queued, running (iteration, ETA),
stopped, finished or failed (with its log's last lines). The executors run the commands: ``local`` (a pool
of worker processes, placed on the visible devices) and ``slurm`` (one job array through submitit; ``job``
is the callable each array task runs). Every run is a separate ``bench run`` process, so a sweep adds no
second way of running: resuming, skipping, locking and stopping on signals are the runner's.
"""
