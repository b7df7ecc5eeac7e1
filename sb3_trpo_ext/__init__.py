"""sb3-trpo-ext: Trust Region Policy Optimization for Stable-Baselines3."""

from sb3_trpo_ext.maskable import MaskableTRPO
from sb3_trpo_ext.recurrent import RecurrentTRPO
from sb3_trpo_ext.trpo import TRPO

__version__ = "0.1.0"

__all__ = ["TRPO", "MaskableTRPO", "RecurrentTRPO", "__version__"]
