"""Optional central differential privacy: Flower's server-side fixed clipping around our strategy.

Three one-round jobs on the same two sites (training is deterministic on CPU): without DP, with clipping only,
with clipping and noise. The clipped aggregate moves the model by at most the clipping norm, the noise has the
standard deviation Flower's Gaussian mechanism promises, and the DP parameters are in the MLflow run.
"""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from server.app import Job, JobSettings, initial_weights
from tests.test_federation_inprocess import configs, grid, sites  # noqa: F401 - fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def one_round(grid, workdir, **federation) -> tuple[Job, dict[str, np.ndarray]]:  # noqa: F811
    model, fed = configs(rounds=1, min_sites=2, consolidate_round=2, **federation)
    job = Job(JobSettings(workdir, f"sqlite:///{workdir / 'mlflow.db'}", "test", False, model, fed))
    job.run(grid)
    return job, job.weights


def flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[k], dtype=np.float64).ravel() for k in sorted(weights)])


@pytest.mark.slow
def test_clipping_bounds_the_update_and_the_noise_has_the_promised_scale(grid, tmp_path) -> None:  # noqa: F811
    model, _ = configs()
    start = flat(initial_weights(model))
    _, plain = one_round(grid, tmp_path / "plain")
    free_norm = np.linalg.norm(flat(plain) - start)
    clip = free_norm / 4  # well below what the sites' averaged update would be
    _, clipped = one_round(grid, tmp_path / "clipped", dp_clipping_norm=clip)
    clipped_norm = np.linalg.norm(flat(clipped) - start)
    assert clipped_norm <= clip * (1 + 1e-5) and clipped_norm < free_norm / 2

    sigma = 0.8
    job, noisy = one_round(grid, tmp_path / "noisy", dp_clipping_norm=clip, dp_noise_multiplier=sigma)
    noise = flat(noisy) - flat(clipped)
    expected_std = sigma * clip / 2  # Flower: noise_multiplier * clipping_norm / sampled sites
    assert abs(noise.std() / expected_std - 1) < 0.05, (noise.std(), expected_std)
    assert abs(noise.mean()) < 5 * expected_std / np.sqrt(noise.size)

    params = MlflowClient(f"sqlite:///{tmp_path / 'noisy' / 'mlflow.db'}").get_run(job.tracker.run_id).data.params
    assert float(params["federation.dp_clipping_norm"]) == pytest.approx(clip)
    assert float(params["federation.dp_noise_multiplier"]) == sigma


@pytest.mark.bad_input
def test_dp_settings_that_make_no_sense_are_refused() -> None:
    from server.config import FederationConfig

    with pytest.raises(ValueError, match="needs a dp_clipping_norm"):
        FederationConfig(dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="must not be negative"):
        FederationConfig(dp_clipping_norm=-1.0)
    assert not FederationConfig().differential_privacy and FederationConfig(dp_clipping_norm=1.0).differential_privacy
