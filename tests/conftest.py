import pytest
import torch as th
from stable_baselines3.common.logger import KVWriter

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


class RecordingWriter(KVWriter):
    """SB3 logger output that keeps every dumped row in memory."""

    def __init__(self):
        self.rows: list[dict] = []

    def write(self, key_values, key_excluded, step=0):
        self.rows.append(dict(key_values))

    def close(self):
        pass


@pytest.fixture
def recording_logger():
    from stable_baselines3.common.logger import Logger

    writer = RecordingWriter()
    return Logger(folder=None, output_formats=[writer]), writer


@pytest.fixture(params=["compiled", "numpy", "torch"])
def array_backend(request, monkeypatch):
    """
    What the hand-written MLP arithmetic runs on: the compiled loops for float32 and float64 CPU tensors, or the
    array-library calls, in NumPy (CPU tensors of other dtypes) or torch (other devices; here on CPU tensors, so
    that CI covers that path without a GPU).
    """
    from sb3_trpo_ext.common import critic, mlp, trust_region

    if request.param != "compiled":
        monkeypatch.setattr(mlp.CompiledChain, "runs_on", staticmethod(lambda weights: False))
    if request.param == "torch":
        for module in (mlp, critic, trust_region):
            monkeypatch.setattr(module, "array_view", lambda tensor: tensor.detach())
    return request.param
