"""
Gymnasium ids for small environments that exercise this package's variants, registered on import.

- ``InvalidActionDiscrete-v0``: sb3-contrib's ``InvalidActionEnvDiscrete`` with 10 actions, 5 of them invalid
  (masked) at each step, 100-step episodes. The observation is the index of the rewarded action, which is never
  masked; reward 1 for choosing it, 0 otherwise. A uniformly random *valid* action scores about 20 per episode,
  an unmasked random one about 10, the optimum is 100. It provides ``action_masks()`` for ``MaskableTRPO``.
"""

import gymnasium as gym

INVALID_ACTION_DISCRETE_ID = "InvalidActionDiscrete-v0"


def register_envs() -> None:
    """Register the ids above with Gymnasium (idempotent)."""
    if INVALID_ACTION_DISCRETE_ID not in gym.registry:
        gym.register(
            INVALID_ACTION_DISCRETE_ID,
            entry_point="sb3_contrib.common.envs:InvalidActionEnvDiscrete",
            kwargs={"dim": 10, "n_invalid_actions": 5, "ep_length": 100},
        )


register_envs()
