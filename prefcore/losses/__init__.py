"""Pairwise preference losses (DESIGN §4): Bradley–Terry (optionally with the vote-disagreement
margin), the PBDE family on sequence log-likelihoods (Luce, length-normalised Luce, DPO), and a
K-annotator latent mixture of BT models fitted by EM for data without annotator ids.

All losses are batch-first, take ``reduction="mean" | "sum" | "none"``, raise ``ValueError``
naming the argument on bad input, and are computed stably (softplus / log-sigmoid)."""
from prefcore.losses.bradley_terry import bradley_terry_loss, vote_margin
from prefcore.losses.latent_mixture import (
    EMHistory,
    LatentAnnotatorMixture,
    latent_mixture_em_step,
    latent_mixture_log_likelihoods,
    latent_mixture_nll,
    latent_mixture_preference,
    latent_mixture_responsibilities,
    weighted_bradley_terry_loss,
)
from prefcore.losses.pbde import dpo_loss, length_normalized_luce_loss, luce_loss, pbde_loss

__all__ = [
    "bradley_terry_loss",
    "vote_margin",
    "pbde_loss",
    "luce_loss",
    "length_normalized_luce_loss",
    "dpo_loss",
    "LatentAnnotatorMixture",
    "EMHistory",
    "latent_mixture_em_step",
    "latent_mixture_log_likelihoods",
    "latent_mixture_nll",
    "latent_mixture_preference",
    "latent_mixture_responsibilities",
    "weighted_bradley_terry_loss",
]
