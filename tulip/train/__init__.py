"""Training one run: the loop, how a step runs on the device, and the training loss with its parts
(regularizers, GloRo). Uses tulip.nn for models, tulip.evaluate.measures for the per-epoch figures."""
