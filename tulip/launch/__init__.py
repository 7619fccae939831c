"""Running many jobs: the local launcher, the Optuna sweeper, Hydra callbacks and the CPU share of
each job. Hydra finds the launcher and sweeper through hydra_plugins/."""
