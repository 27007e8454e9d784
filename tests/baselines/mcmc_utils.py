"""Effective sample size for tolerances of MCMC tests (Geyer's initial positive sequence)."""

import numpy as np


def effective_sample_size(series: np.ndarray) -> float:
    """ESS of a scalar statistic recorded as ``series[chain, t]`` over independent chains.

    τ = 1 + 2 Σ_k ρ_k with the chain-averaged autocorrelation ρ_k, summed over pairs (ρ_{2m} + ρ_{2m+1})
    while they stay positive; ESS = (chains × length) / τ.
    """
    x = np.asarray(series, np.float64)
    m, n = x.shape
    x = x - x.mean()
    f = np.fft.rfft(x, 2 * n, axis=1)
    acov = np.fft.irfft(f * np.conj(f), axis=1)[:, :n].mean(axis=0) / n
    rho = acov / acov[0]
    tau = -1.0
    for k in range(0, n - 1, 2):
        pair = rho[k] + rho[k + 1]
        if pair <= 0:
            break
        tau += 2.0 * pair
    return m * n / max(tau, 1.0)


def check_gaussian_moments(samples: np.ndarray, mean: np.ndarray, cov: np.ndarray, z: float = 4.5,
                           rel_bias: float = 0.0):
    """Asserts per-coordinate means and covariance entries of ``samples[chain, t, d]`` are within z·sd/√ESS.

    The sd of a covariance entry estimate uses the Gaussian fourth moment Var(xᵢxⱼ) = ΣᵢᵢΣⱼⱼ + Σᵢⱼ².
    ``rel_bias`` adds a known bound on the sampler's covariance bias, as that fraction of √(ΣᵢᵢΣⱼⱼ).
    Returns the ESS of each statistic (for reporting).
    """
    d = samples.shape[-1]
    ess = {}
    for i in range(d):
        e = effective_sample_size(samples[..., i])
        ess[f"mean{i}"] = e
        err = abs(samples[..., i].mean() - mean[i])
        assert err < z * np.sqrt(cov[i, i] / e), (i, err, z * np.sqrt(cov[i, i] / e), e)
    centred = samples - mean
    for i in range(d):
        for j in range(i, d):
            prod = centred[..., i] * centred[..., j]
            e = effective_sample_size(prod)
            ess[f"cov{i}{j}"] = e
            tol = z * np.sqrt((cov[i, i] * cov[j, j] + cov[i, j] ** 2) / e) + rel_bias * np.sqrt(cov[i, i] * cov[j, j])
            err = abs(prod.mean() - cov[i, j])
            assert err < tol, (i, j, prod.mean(), cov[i, j], tol, e)
    return ess
