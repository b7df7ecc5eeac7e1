"""Callbacks specific to the trust-region algorithms."""

from typing import cast

from stable_baselines3.common.callbacks import BaseCallback

from sb3_trpo_ext.common.validation import check_float, check_target_kl
from sb3_trpo_ext.trpo import TRPO


class TargetKLSchedule(BaseCallback):
    """
    Shrink the trust-region radius ``target_kl`` linearly over a ``learn()`` call.

    Before each update the radius is ``target_kl * (1 - (1 - final_fraction) * t / T)``, with ``t`` the steps taken
    and ``T`` the run's total (SB3's progress, as its learning-rate schedules use it): full-size steps early, when the
    policy is far from good, and smaller ones late, so that one bad update near the end cannot undo a good policy.
    When training ends the model gets its configured radius back, so a saved model and a later ``learn()`` start
    from it. Works for ``TRPO``, ``RecurrentTRPO`` and ``MaskableTRPO``. In an RL Zoo YAML entry::

        callback:
          - sb3_trpo_ext.callbacks.TargetKLSchedule:
              final_fraction: 0.2

    :param final_fraction: Radius at the end of the run, as a fraction of the configured ``target_kl``, in (0, 1]
        (1 keeps it constant)
    :param verbose: Verbosity level
    """

    def __init__(self, final_fraction: float = 0.2, verbose: int = 0):
        super().__init__(verbose)
        self.final_fraction = check_float("final_fraction", final_fraction, low=0.0, high=1.0, low_open=True)
        self.initial_target_kl: float | None = None

    @property
    def trpo(self) -> TRPO:
        """The model, typed as the TRPO that ``_on_training_start`` checked it to be."""
        return cast(TRPO, self.model)

    def _on_training_start(self) -> None:
        if not isinstance(self.model, TRPO):
            raise TypeError(
                f"TargetKLSchedule needs a TRPO model (TRPO, RecurrentTRPO or MaskableTRPO), got {type(self.model).__name__}"
            )
        self.initial_target_kl = check_target_kl(self.trpo.target_kl)

    def _on_rollout_end(self) -> None:
        assert self.initial_target_kl is not None
        progress = min(1.0, self.trpo.num_timesteps / self.trpo._total_timesteps)
        self.trpo.target_kl = self.initial_target_kl * (1.0 - (1.0 - self.final_fraction) * progress)
        self.logger.record("train/target_kl", self.trpo.target_kl)

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        if self.initial_target_kl is not None:
            self.trpo.target_kl = self.initial_target_kl
