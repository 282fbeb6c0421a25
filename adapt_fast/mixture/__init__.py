"""Task mixtures: ADAPT's learned mixture and the static baselines (DESIGN.md section 1)."""

from adapt_fast.mixture.adapt import AdaptMixture, AdaptSettings, mixture_entropy
from adapt_fast.mixture.static import STATIC_METHODS, static_mixture

__all__ = ["STATIC_METHODS", "AdaptMixture", "AdaptSettings", "mixture_entropy", "static_mixture"]
