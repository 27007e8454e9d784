"""The Langevin methods and bSAM, driven through the method interface, against an analytic posterior.

Model: conjugate Bayesian linear regression y = Xw + ε, ε ~ N(0, s²), prior w ~ N(0, α⁻¹ I), N = 50, D = 2.
The problem hands the methods the *per-example mean* negative log-likelihood
ℓ(w) = (1/N) Σᵢ (xᵢᵀw − yᵢ)²/(2s²) and the Gaussian log-prior, so the Langevin methods run on
U(w) = N ℓ(w) − log p(w) = ‖Xw − y‖²/(2s²) + α‖w‖²/2 (+ const), whose Gibbs law exp(−U/T) is
N(μ*, T Λ⁻¹) with Λ = XᵀX/s² + α I (the Hessian of U) and μ* = Λ⁻¹ Xᵀy/s².

Chains: every chain is one run of the method's trainer (``trainer.init`` / ``trainer.step`` / ``trainer.finalize``)
with its own noise key (what ``seed`` sets), vmapped; the gradients are full-batch, so the only noise is
the Langevin noise. Samples are what ``finalize`` returns (one per cycle, two for E-MCMC); the first
cycle is burn-in from w = 0 and is dropped.

Tolerances (``_check_moments``): an estimated mean or covariance entry differs from its target by at most
z·sd/√ESS (z = 4.5, the Monte-Carlo error; ESS from the cycle-end series of every chain, Geyer's initial
positive sequence) plus the step-size bias. For a Gaussian, Euler–Maruyama at a constant step h keeps the
mean exactly and has stationary variance T/(λ(1 − hλ/2)) along an eigen-direction of curvature λ: a
relative bias ≤ h_peak λ_max/2 (the cosine schedule only lowers h), allowed for on the covariance
entries as that fraction of √(ΣᵢᵢΣⱼⱼ). The sd of a covariance entry uses the Gaussian fourth moment
Var(xᵢxⱼ) = ΣᵢᵢΣⱼⱼ + Σᵢⱼ².
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpbma import methods
from fpbma.baselines._sgld import PSGLDState, SGLDState
from tests.baselines.mcmc_utils import effective_sample_size

N, D, NOISE_STD, ALPHA = 50, 2, 1.0, 1.0
Z = 4.5
STEP_CURVATURE = 0.04  # h_peak · λ_max: the largest step on U times the largest curvature


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = x @ np.array([1.0, -0.5]) + NOISE_STD * rng.normal(size=N)
    precision = x.T @ x / NOISE_STD ** 2 + ALPHA * np.eye(D)
    mean = np.linalg.solve(precision, x.T @ y / NOISE_STD ** 2)
    return x, y, mean, precision


def _problem():
    x, y, _, _ = _data()
    loss = lambda w, batch, key: jnp.mean(0.5 * (batch["x"] @ w["w"] - batch["y"]) ** 2) / NOISE_STD ** 2  # noqa: E731
    log_prior = lambda w: -0.5 * ALPHA * jnp.sum(w["w"] ** 2)  # noqa: E731
    problem = methods.plain_problem(loss, {"w": jnp.zeros(D, jnp.float32)}, N, log_prior=log_prior)
    return problem, {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}


def _chains(name, *, learning_rate, num_steps, n_cycle, chains, **hp):
    """``samples[chain, sample, d]`` from ``finalize`` of ``chains`` runs of the method, each its own key."""
    problem, batch = _problem()
    trainer = methods.get(name).trainer(problem, learning_rate=learning_rate, num_steps=num_steps,
                                        n_cycle=n_cycle, **hp)
    state0 = trainer.init()
    keys = jax.random.split(jax.random.PRNGKey(1), chains)
    states = jax.vmap(lambda k: state0._replace(opt_state=state0.opt_state._replace(key=k)))(keys)
    loss_key = jax.random.PRNGKey(0)  # the loss ignores its key: the gradients are full-batch

    @jax.jit
    @jax.vmap
    def run(state):
        return jax.lax.scan(lambda s, _: (trainer.step(s, batch, loss_key), None), state, None, length=num_steps)[0]

    final = jax.device_get(run(states))
    assert np.all(final.step == num_steps)
    out = [np.asarray(trainer.finalize(jax.tree.map(lambda a: a[c], final)).samples["w"]) for c in range(chains)]
    return np.stack(out)


def _check_moments(samples, mean, cov, rel_bias):
    """Asserts the sample mean and covariance of ``samples[chain, t, d]`` within z·sd/√ESS (+ the bias).

    Returns {statistic: (error, tolerance)} for the report.
    """
    report = {}
    for i in range(D):
        tol = Z * math.sqrt(cov[i, i] / effective_sample_size(samples[..., i]))
        err = abs(samples[..., i].mean() - mean[i])
        report[f"mean{i}"] = (err, tol)
        assert err < tol, (i, err, tol)
    centred = samples - mean
    for i in range(D):
        for j in range(i, D):
            prod = centred[..., i] * centred[..., j]
            scale = math.sqrt(cov[i, i] * cov[j, j])
            tol = Z * math.sqrt((cov[i, i] * cov[j, j] + cov[i, j] ** 2) / effective_sample_size(prod)) \
                + rel_bias * scale
            err = abs(prod.mean() - cov[i, j])
            report[f"cov{i}{j}"] = (err, tol)
            assert err < tol, (i, j, prod.mean(), cov[i, j], tol)
    return report


# ------------------------------------------------------------------------------------------------
# SGLD: cycle-end samples of N(μ*, T Λ⁻¹).


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_sgld_samples_the_exact_posterior_and_temperature_scales_its_covariance(temperature):
    _, _, mean, precision = _data()
    lam = np.linalg.eigvalsh(precision)
    # The step on U is learning_rate/N: h_peak λ_max = STEP_CURVATURE, so the relative variance bias is at
    # most 2 %. A cycle of L steps (no exploration) relaxes the slowest mean direction by
    # exp(−Σ_k h_k λ_min) = exp(−h_peak λ_min L/2) ≈ e^−6 here: cycle-end samples are nearly independent,
    # and the first cycle forgets w = 0 (≈ 7 posterior sds away) to well below the tolerance.
    learning_rate = STEP_CURVATURE * N / lam[-1]
    length = int(math.ceil(12.0 / (STEP_CURVATURE * lam[0] / lam[-1])))
    n_cycle = 5
    samples = _chains("sgld", learning_rate=learning_rate, num_steps=n_cycle * length, n_cycle=n_cycle,
                      chains=1024, exploration_ratio=0.0, temperature=temperature)
    assert samples.shape == (1024, n_cycle, D)
    report = _check_moments(samples[:, 1:], mean, temperature * np.linalg.inv(precision), STEP_CURVATURE / 2)
    print(temperature, length, {k: (f"{e:.2e}", f"{t:.2e}") for k, (e, t) in report.items()})


# ------------------------------------------------------------------------------------------------
# E-MCMC: the joint law of (w, w_a).


def test_emcmc_weights_and_guides_sample_the_marginals_of_the_joint():
    # fpbma/baselines/_emcmc.py takes SGLD steps α on the joint energy E(w, w_a) = U(w) + ‖w − w_a‖²/(2η)
    # with noise √(2αT) on both, so the chain's law is ∝ exp(−E/T), a Gaussian with precision H_J/T,
    #     H_J = [[Λ + I/η, −I/η], [−I/η, I/η]].
    # Given w, w_a ~ N(w, ηT I): integrating w_a out leaves exp(−U(w)/T), so w ~ N(μ*, T Λ⁻¹) exactly, and
    # w_a = w + √(ηT) ζ ~ N(μ*, T (Λ⁻¹ + η I)).
    _, _, mean, precision = _data()
    # η = 1/mean(Λᵢᵢ): the coupling is as stiff as the likelihood, so the guide's extra variance ηT is
    # as large as the posterior's (a clear difference between the two marginals) while the joint stays
    # well conditioned (for one coordinate of curvature λ, H_J's condition number is smallest near 1/η ≈ λ/2).
    eta, temperature = 1.0 / np.mean(np.diag(precision)), 1.0
    eye = np.eye(D)
    joint = np.block([[precision + eye / eta, -eye / eta], [-eye / eta, eye / eta]])
    joint_cov = temperature * np.linalg.inv(joint)
    cov_w, cov_guide = temperature * np.linalg.inv(precision), temperature * (np.linalg.inv(precision) + eta * eye)
    np.testing.assert_allclose(joint_cov[:D, :D], cov_w, rtol=1e-10)
    np.testing.assert_allclose(joint_cov[D:, D:], cov_guide, rtol=1e-10)
    lam = np.linalg.eigvalsh(joint)  # the step-size bias and the mixing time are the joint's
    learning_rate = STEP_CURVATURE * N / lam[-1]
    length = int(math.ceil(12.0 / (STEP_CURVATURE * lam[0] / lam[-1])))
    n_cycle = 5
    samples = _chains("emcmc", learning_rate=learning_rate, num_steps=n_cycle * length, n_cycle=n_cycle,
                      chains=512, exploration_ratio=0.0, temperature=temperature, eta=float(eta))
    assert samples.shape == (512, 2 * n_cycle, D)  # w, w_a at the end of every cycle
    w, guide = samples[:, 2::2], samples[:, 3::2]
    report_w = _check_moments(w, mean, cov_w, STEP_CURVATURE / 2)
    report_g = _check_moments(guide, mean, cov_guide, STEP_CURVATURE / 2)
    print(length, {k: (f"{e:.2e}", f"{t:.2e}") for k, (e, t) in {**report_w, **report_g}.items()})


# ------------------------------------------------------------------------------------------------
# bSAM: the fixed point of its update on a quadratic loss.


def _bsam_fixed_point(h, mu_ml, delta, gamma, rho, c):
    """(m, s) where bSAM's expected update vanishes, for ℓ(w) = ½ (w − μ_ml)ᵀ H (w − μ_ml) (+ const).

    From fpbma/baselines/_bsam.py, with e ~ N(0, c²/(N s)), g = ∇ℓ(m + e) = H(m + e − μ_ml) and
    g_ε = ∇ℓ(m + ρ g/s) = H(m − μ_ml) + ρ H (g/s):
      momentum: E[g_ε] + δ m = 0  ⇔  (H + δ I + ρ H S⁻¹ H) m = (H + ρ H S⁻¹ H) μ_ml        (S = diag s);
      precision: s = E[√s ⊙ |g|] + δ + γ, with gᵢ ~ N(μᵢ, vᵢ), μ = H(m − μ_ml),
      v = diag(H diag(c²/(N s)) H),
      and E|gᵢ| = √vᵢ √(2/π) exp(−μᵢ²/(2vᵢ)) + μᵢ erf(μᵢ/√(2vᵢ)) (the folded normal's mean).
    Solved by iterating the two maps (the precision's is what the β₂-average does).
    """
    s = np.ones(len(mu_ml))
    for _ in range(2000):
        a = h @ np.diag(1.0 / s) @ h
        m = np.linalg.solve(h + delta * np.eye(len(s)) + rho * a, (h + rho * a) @ mu_ml)
        mu = h @ (m - mu_ml)
        v = np.diag(h @ np.diag(c ** 2 / (N * s)) @ h)
        abs_g = np.sqrt(v) * np.sqrt(2 / np.pi) * np.exp(-mu ** 2 / (2 * v)) \
            + mu * np.vectorize(math.erf)(mu / np.sqrt(2 * v))
        s = np.sqrt(s) * abs_g + delta + gamma
    return m, s, v, abs_g


def test_bsam_reaches_the_fixed_point_of_its_update():
    x, y, mean, precision = _data()
    h = x.T @ x / (N * NOISE_STD ** 2)  # Hessian of the mean loss ℓ
    mu_ml = np.linalg.solve(x.T @ x, x.T @ y)
    # bSAM trains on ℓ alone (the point adapter): the prior enters as weight decay δ = α/N, for which
    # ρ → 0 makes the mean's fixed point (H + δ I) m = H μ_ml, the posterior mean μ*.
    delta, gamma, rho, beta2 = ALPHA / N, 0.1, 0.05, 0.999
    m_fp, s_fp, v, abs_g = _bsam_fixed_point(h, mu_ml, delta, gamma, rho, 1.0)
    np.testing.assert_allclose(np.linalg.solve(h + delta * np.eye(D), h @ mu_ml), mean, rtol=1e-10)
    problem, batch = _problem()
    steps, runs = 12_000, 8
    trainer = methods.get("bsam").trainer(problem, learning_rate=0.05, num_steps=steps, schedule="cosine",
                                          rho=rho, weight_decay=delta, damping=gamma, beta2=beta2, s_init=1.0)
    state0 = trainer.init()
    keys = jax.random.split(jax.random.PRNGKey(2), runs)  # `runs` seeds of the noise e
    states = jax.vmap(lambda k: state0._replace(opt_state=state0.opt_state._replace(key=k)))(keys)
    run = jax.jit(jax.vmap(lambda s: jax.lax.scan(
        lambda t, _: (trainer.step(t, batch, jax.random.PRNGKey(0)), None), s, None, length=steps)[0]))
    final = jax.device_get(run(states))
    qs = [trainer.finalize(jax.tree.map(lambda a: a[r], final)) for r in range(runs)]
    m = np.stack([np.asarray(q.mean["w"]) for q in qs])
    var = np.stack([np.exp(2 * np.asarray(q.log_std["w"])) for q in qs])
    var_fp = 1.0 / (N * s_fp)
    # Precision: s is a β₂-average of u = √s|g| + δ + γ over i.i.d. draws of e, so its stationary sd is
    # sd(u)·√((1 − β₂)/(1 + β₂)) with sd(u) = √s·sd|g| ≤ √s·√(v + μ²) (|g|'s sd is below its rms);
    # σ² = 1/(N s) has the same relative error. Tolerance: z of it, plus e^{−(1−β₂)K} of the start's
    # offset |s₀ − s|/s (s follows its average whatever the learning rate).
    sd_rel = np.sqrt(s_fp) * np.sqrt(v + (h @ (m_fp - mu_ml)) ** 2) * math.sqrt((1 - beta2) / (1 + beta2)) / s_fp
    tol_var = Z * sd_rel + math.exp(-(1 - beta2) * steps) * np.abs(1.0 - s_fp) / s_fp
    err_var = np.abs(var / var_fp - 1.0)
    # Mean: each run ends at m_fp plus the noise of g_ε that the cosine decay has not averaged out, i.i.d.
    # over the seeds; their average is tested with the seeds' own spread (a t-test: |t| < 6 with 7 degrees
    # of freedom fails by chance with probability < 1e-3), in posterior sds.
    post_sd = np.sqrt(np.diag(np.linalg.inv(precision)))
    err = (m - m_fp) / post_sd
    t = np.abs(err.mean(0)) / (err.std(0, ddof=1) / math.sqrt(runs))
    print("var rel err (max over runs)", err_var.max(0), "tol", tol_var, "mean err/sd", err.mean(0),
          "spread", err.std(0, ddof=1), "t", t, "fixed point − posterior mean (sd)", (m_fp - mean) / post_sd,
          "var_fp", var_fp, "posterior var", np.diag(np.linalg.inv(precision)))
    assert np.all(err_var < tol_var), (err_var, tol_var)
    assert np.all(t < 6.0), (err, t)
    # The fixed point's mean is μ* shifted by the ρ term by a few hundredths of a posterior sd here, and it
    # is μ* as ρ → 0; its variance is 1/(N s), not 1/Λᵢᵢ (bSAM's √s|g| curvature estimate).
    assert np.all(np.abs(m_fp - mean) / post_sd < 0.05)
    m_rho0, _, _, _ = _bsam_fixed_point(h, mu_ml, delta, gamma, 1e-9, 1.0)
    np.testing.assert_allclose(m_rho0, mean, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# pSGLD through the method.


def test_sgld_preconditioner_none_is_the_unpreconditioned_path_bit_for_bit():
    from fpbma.baselines._sgld import csgld
    from fpbma.methods._adapters import langevin

    problem, batch = _problem()
    steps, n_cycle, lr = 60, 3, 0.05
    plain = langevin("sgld", problem, csgld(lr / N, num_steps=steps, n_cycle=n_cycle, exploration_ratio=0.5,
                                            temp=1.0, seed=3),
                     num_steps=steps, n_cycle=n_cycle, collect=lambda params, opt_state: (params,))
    runs = [plain] + [methods.get("sgld").trainer(problem, learning_rate=lr, num_steps=steps, n_cycle=n_cycle,
                                                  exploration_ratio=0.5, seed=3, **hp)
                      for hp in ({}, {"preconditioner": "none"})]
    outs = []
    for trainer in runs:
        state = trainer.init()
        assert type(state.opt_state) is SGLDState  # the unpreconditioned transform, not pSGLD's
        step = jax.jit(trainer.step)
        for k in range(steps):
            state = step(state, batch, jax.random.PRNGKey(k))
        outs.append(np.asarray(trainer.finalize(state).samples["w"]))
    assert outs[0].shape == (n_cycle, D)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_psgld_method_with_a_frozen_preconditioner_samples_the_exact_posterior():
    # precond_decay = 1 freezes V at the first step's (∇U(0)/N)², so P = 1/(ε + |Xᵀy|/(N s²)) is a constant
    # diagonal matrix known in closed form. Langevin dw = −P∇U dt + √(2PT) dB keeps exp(−U/T) exactly
    # (its Fokker–Planck flux P(∇U p + T∇p) vanishes there), and Euler–Maruyama with step h is plain
    # Euler–Maruyama in v = P^{−1/2} w on the Hessian P^{1/2} Λ P^{1/2}: the same bias bound h_peak λ_max/2
    # with λ the preconditioned eigenvalues.
    x, y, mean, precision = _data()
    p_diag = 1.0 / (1e-5 + np.abs(x.T @ y) / (N * NOISE_STD ** 2))
    pre = np.sqrt(p_diag)[:, None] * precision * np.sqrt(p_diag)[None, :]
    lam = np.linalg.eigvalsh(pre)
    learning_rate = STEP_CURVATURE * N / lam[-1]  # the step on U is (lr/N) P
    length = int(math.ceil(12.0 / (STEP_CURVATURE * lam[0] / lam[-1])))
    n_cycle = 5
    samples = _chains("sgld", learning_rate=learning_rate, num_steps=n_cycle * length, n_cycle=n_cycle,
                      chains=1024, exploration_ratio=0.0, preconditioner="rmsprop", precond_decay=1.0)
    report = _check_moments(samples[:, 1:], mean, np.linalg.inv(precision), STEP_CURVATURE / 2)
    print(length, {k: (f"{e:.2e}", f"{t:.2e}") for k, (e, t) in report.items()})


@pytest.mark.parametrize("hp, match", [
    ({"preconditioner": "adam"}, r"preconditioner='adam' is not a preconditioner; use one of \('none', 'rmsprop'\)"),
    ({"preconditioner": "rmsprop", "precond_decay": 1.5}, "precond_decay"),
    ({"preconditioner": "rmsprop", "precond_eps": 0.0}, "precond_eps"),
])
def test_sgld_rejects_a_bad_preconditioner(hp, match):
    with pytest.raises(ValueError, match=match):
        methods.get("sgld").check(hp, num_steps=10)


def test_psgld_state_holds_the_square_average_of_the_mean_gradient():
    problem, batch = _problem()
    trainer = methods.get("sgld").trainer(problem, learning_rate=0.01, num_steps=4, n_cycle=1,
                                          preconditioner="rmsprop")
    state = trainer.step(trainer.init(), batch, jax.random.PRNGKey(0))
    assert isinstance(state.opt_state, PSGLDState)
    # First step from w = 0: V = (∇U(0)/N)² = (−Xᵀy/(N s²))² (the prior's gradient vanishes at 0).
    x, y, _, _ = _data()
    np.testing.assert_allclose(np.asarray(state.opt_state.square_avg["w"]), (x.T @ y / (N * NOISE_STD ** 2)) ** 2,
                               rtol=1e-5)
