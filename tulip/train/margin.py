"""Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, "Lipschitz-Margin Training", NeurIPS 2018,
arXiv 1802.04034), as 1-Lipschitz networks are trained (Prach & Lampert 2022, Araujo et al. 2023).

Cross-entropy on logits in which every wrong class i is raised by the margin the certificate needs at
the training radius ε: f_i + ε·K₋·‖w_i − w_y‖₂ for i ≠ y. Where that loss is low, the true class wins by
more than any perturbation of norm ε can move the gap: the sample is certified at ε. Tsuzuku et al.
used the global margin √2·ε·K; the pairwise one is what tulip.evaluate.bounds certifies. Unlike GloRo
(tulip.train.gloro), the margin is taken against the label, not the prediction, and there is no ⊥ class.
"""
import torch.nn.functional as F

from tulip.train.gloro import CertifiedMargin
from tulip.train.loss import TrainingBatch


class MarginPenalty(CertifiedMargin):
    """Cross-entropy on the margin-offset logits at L2 radius ``eps``, as the extra loss over plain
    cross-entropy. For a body that is 1-Lipschitz by construction (model=aol_4c3f, model=sll) K₋ = 1;
    for a plain chain (model=cnn_4c3f) K₋ is GloRo's power-iteration estimate. Arguments as
    CertifiedMargin's."""

    def __call__(self, batch: TrainingBatch):
        offset = batch.logits + self.offsets(batch, batch.y)  # (B, C); the true class keeps its logit
        return F.cross_entropy(offset, batch.y) - F.cross_entropy(batch.logits, batch.y)
