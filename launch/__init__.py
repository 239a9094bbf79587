"""Launchers that start comigs_dist experiments on a Slurm cluster (outside the package).

Owns: planning one Slurm job from a config (`plan`, used by `slurm/comigs.sh`), submitting sweeps
through submitit (`submit`) and gathering finished runs into one table (`collect`).
Knows nothing of models, methods or training: it builds command lines for
``comigs_dist.main`` and reads the results.json files that runs write.
"""
