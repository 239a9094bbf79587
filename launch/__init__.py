"""Launchers that start comigs_dist experiments on a Slurm cluster (outside the package).

Owns: planning one Slurm job from a config (`plan`, used by `slurm/comigs.sh`), submitting sweeps
through submitit (`submit`), gathering finished runs into one table (`collect`) and one of the
paper's tables or figures run and printed beside the paper's numbers (`reproduce`).
Knows nothing of models, methods or training: it builds command lines for
``comigs_dist.main`` and reads the results.json files that runs write.
"""
