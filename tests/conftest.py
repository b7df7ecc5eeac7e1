import pytest
import torch as th

# Two threads on two shared cores were several times slower than one under load (developers' brief).
th.set_num_threads(1)


@pytest.fixture
def float64_policies(monkeypatch):
    """Let SB3 policies run on float64 observations: its preprocessing otherwise casts them to float32."""
    import stable_baselines3.common.policies as sb3_policies

    original = sb3_policies.preprocess_obs

    def preprocess_obs_float64(obs, *args, **kwargs):
        preprocessed = original(obs, *args, **kwargs)
        return preprocessed.double() if obs.dtype == th.float64 else preprocessed

    monkeypatch.setattr(sb3_policies, "preprocess_obs", preprocess_obs_float64)
