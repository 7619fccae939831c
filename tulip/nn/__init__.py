"""Networks and what is known about them without data: the models, the perturbations every attack and
regularizer shares, and the Lipschitz bounds of their layers. Imports nothing else of Tulip."""
