"""Judging a model: per-epoch measures, attacks (Tulip's and AutoAttack), lower bounds and the
certificate, nearest neighbours, the final evaluation and the evaluate/summary modes."""
