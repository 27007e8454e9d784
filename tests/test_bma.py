"""BMA predictive against a plain Python loop over the same samples; chunking, batching, memory, BN refresh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import fpbma
from fpbma import bma
from fpbma.types import SampleSet
from fpbma.data.pipeline import batches

N_IN, N_HIDDEN, N_CLASSES = 6, 8, 4


def mlp_apply(w, x):
    return jnp.tanh(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]


def _posterior(key):
    k1, k2 = jax.random.split(key)
    mean = {"w1": jax.random.normal(k1, (N_IN, N_HIDDEN)), "b1": jnp.zeros(N_HIDDEN),
            "w2": jax.random.normal(k2, (N_HIDDEN, N_CLASSES)), "b2": jnp.zeros(N_CLASSES)}
    # Large spread so samples disagree and averaging probabilities differs from averaging logits.
    return fpbma.DiagGaussian.from_point(mean, 1.0)


def _loop_reference(q, key, x, num_samples):
    """log of the mean of softmax over samples, one sample at a time in float64 NumPy."""
    logits_of = jax.jit(lambda k: mlp_apply(fpbma.sample(q, k), jnp.asarray(x)))
    probs, all_logits = [], []
    for k in jax.random.split(key, num_samples):
        logits = np.asarray(logits_of(k), np.float64)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs.append(e / e.sum(-1, keepdims=True))
        all_logits.append(logits)
    return np.log(np.mean(probs, axis=0)), np.stack(all_logits)


@pytest.fixture(scope="module")
def setup():
    q = _posterior(jax.random.PRNGKey(0))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (37, N_IN)), np.float32)
    key = jax.random.PRNGKey(2)
    ref, logits = _loop_reference(q, key, x, 30)
    # Averaging logits instead of probabilities gives a different answer, so comparisons with ref can fail.
    mean_logits = logits.mean(0)
    wrong = mean_logits - np.log(np.exp(mean_logits).sum(-1, keepdims=True))
    assert np.max(np.abs(wrong - ref)) > 0.1
    return q, x, key, ref


@pytest.mark.parametrize("chunk_size", [1, 7, 30])
def test_predict_equals_python_loop_for_any_chunk_size(setup, chunk_size):
    q, x, key, ref = setup
    lp = bma.predict(Partial(mlp_apply), Partial(fpbma.sample, q), x, key=key, num_samples=30,
                     chunk_size=chunk_size)
    assert lp.shape == (37, N_CLASSES)
    np.testing.assert_allclose(np.asarray(lp), ref, rtol=2e-5, atol=2e-5)


def test_predict_samples_equals_python_loop(setup):
    q, x, key, ref = setup
    stacked = fpbma.sample(q, key, 30)
    # fpbma.sample(q, key, n) uses split(key, n) per sample: the same 30 weights as the loop.
    for chunk in (4, 30):
        lp = bma.predict_samples(mlp_apply, SampleSet(stacked), x, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(lp), ref, rtol=2e-5, atol=2e-5)


class _ListSource:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


def _apply_images(w, x):
    return mlp_apply(w, x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def image_data(setup):
    q, _, key, _ = setup
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 2, 3, 1), dtype=np.uint8)  # 23 = 2 full batches of 8 + 7 (1 padded)
    labels = rng.integers(0, N_CLASSES, 23)
    full = images.astype(np.float32) / 255.0
    lp_a = bma.predict(Partial(_apply_images), Partial(fpbma.sample, q), full, **_IMAGE_KW, key=key)
    return _ListSource(images, labels), labels, full, lp_a


_IMAGE_KW = dict(num_samples=6, chunk_size=3)


@pytest.mark.parametrize("layout", ["flat", "stack"])
def test_iterator_of_padded_batches_equals_single_array(setup, image_data, layout):
    q, _, key, _ = setup
    source, labels, _, lp_a = image_data
    lp_b, lab = bma.predict(Partial(_apply_images), Partial(fpbma.sample, q),
                            batches(source, 8, train=False, layout=layout, num_devices=1), return_labels=True,
                            key=key, **_IMAGE_KW)
    assert lp_b.shape == (23, N_CLASSES)
    np.testing.assert_array_equal(np.asarray(lab), labels)
    np.testing.assert_allclose(np.asarray(lp_b), np.asarray(lp_a), rtol=1e-6, atol=1e-6)


def test_masked_array_input_drops_padding_rows(setup, image_data):
    q, _, key, _ = setup
    _, _, full, lp_a = image_data
    padded = np.concatenate([full[:8], full[:1], full[8:], full[:4]])
    mask = np.r_[np.ones(8, bool), False, np.ones(15, bool), np.zeros(4, bool)]
    lp_m = bma.predict(Partial(_apply_images), Partial(fpbma.sample, q), padded, mask=mask, key=key, **_IMAGE_KW)
    np.testing.assert_allclose(np.asarray(lp_m), np.asarray(lp_a), rtol=1e-6, atol=1e-6)


def _temp_bytes(num_samples, chunk_size, q, x):
    lowered = bma._sampled_log_predictive.lower(
        Partial(mlp_apply), Partial(fpbma.sample, q), None, jax.random.PRNGKey(0), x,
        num_samples=num_samples, chunk_size=chunk_size)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_number_of_samples(setup):
    q, _, _, _ = setup
    x = jnp.ones((1024, N_IN))  # (N, hidden) activations dominate the temporaries
    small = _temp_bytes(30, 10, q, x)
    large = _temp_bytes(300, 10, q, x)
    assert large / small < 1.5, (small, large)
    # The test can fail: vectorising 100 samples at once needs far more temporary memory.
    unchunked = _temp_bytes(100, 100, q, x)
    assert unchunked > 5 * large, (large, unchunked)


def test_evaluate_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 5)) * 3
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y = rng.integers(0, 5, 200)
    out = bma.evaluate(jnp.asarray(lp, jnp.float32), jnp.asarray(y))
    p = np.exp(lp)
    conf, pred = p.max(1), p.argmax(1)
    np.testing.assert_allclose(out["acc"], np.mean(pred == y), rtol=1e-6)
    np.testing.assert_allclose(out["nll"], -np.mean(lp[np.arange(200), y]), rtol=1e-5)
    np.testing.assert_allclose(out["brier"], np.mean(((p - np.eye(5)[y]) ** 2).sum(1)), rtol=1e-5)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = sum(abs(np.mean(pred[bins == b] == y[bins == b]) - conf[bins == b].mean()) * np.mean(bins == b)
              for b in range(15) if np.any(bins == b))
    np.testing.assert_allclose(out["ece"], ece, rtol=1e-4, atol=1e-6)


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_in")(x)
        x = nn.Dense(5, name="dense")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn_mid")(x)
        return nn.Dense(3, name="head")(x)


def _numpy_bn_reference(variables, images, batch_size, eps=1e-5):
    """Exact statistics by brute force: train-mode normalisation per batch, then moments over all images."""
    p = {k: np.asarray(v, np.float64) for k, v in
         {"s": variables["params"]["bn_in"]["scale"], "b": variables["params"]["bn_in"]["bias"],
          "w": variables["params"]["dense"]["kernel"], "c": variables["params"]["dense"]["bias"]}.items()}
    x = np.asarray(images, np.float64)
    mids = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        xn = (xb - xb.mean(0)) / np.sqrt(xb.var(0) + eps) * p["s"] + p["b"]
        mids.append(xn @ p["w"] + p["c"])
    mid = np.concatenate(mids)
    return (x.mean(0), x.var(0, ddof=1)), (mid.mean(0), mid.var(0, ddof=1))


def test_batchnorm_refresh_gives_exact_population_statistics():
    model = _BNNet()
    images = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (50, 4)) * 2.0 + 3.0)
    variables = model.init(jax.random.PRNGKey(4), images[:2])
    variables = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(5), a.shape), variables)
    refresh = bma.make_batchnorm_refresh(model, images, batch_size=16)  # 16+16+16+2
    new = jax.jit(lambda v, k: refresh(v, k))(variables, jax.random.PRNGKey(0))
    (m_in, v_in), (m_mid, v_mid) = _numpy_bn_reference(variables, images, 16)
    np.testing.assert_allclose(new["batch_stats"]["bn_in"]["mean"], m_in, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["bn_in"]["var"], v_in, rtol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["bn_mid"]["mean"], m_mid, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["bn_mid"]["var"], v_mid, rtol=1e-4)
    assert jax.tree.structure(new) == jax.tree.structure(variables)


def test_predict_with_refresh_equals_loop_that_refreshes_each_sample():
    model = _BNNet()
    images = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (16, 4)))
    variables = model.init(jax.random.PRNGKey(7), images[:2])
    q = fpbma.DiagGaussian.from_point(variables["params"], 0.3)
    stats = variables["batch_stats"]
    sample_weights = Partial(lambda q_, s_, k: {"params": fpbma.sample(q_, k), "batch_stats": s_}, q, stats)
    refresh = bma.make_batchnorm_refresh(model, images, batch_size=8)
    apply_fn = Partial(lambda v, x: model.apply(v, x, train=False))
    x = images[:7] + 0.5
    key = jax.random.PRNGKey(8)
    lp = bma.predict(apply_fn, sample_weights, x, key=key, num_samples=4, chunk_size=2, refresh_fn=refresh)
    refresh_jit = jax.jit(lambda w, k: refresh(w, k))
    apply_jit = jax.jit(lambda w: jax.nn.softmax(model.apply(w, x, train=False)))
    probs = []
    for k in jax.random.split(key, 4):
        w = refresh_jit(sample_weights(k), jax.random.fold_in(k, 1))
        (m_in, v_in), _ = _numpy_bn_reference(w, images, 8)
        np.testing.assert_allclose(w["batch_stats"]["bn_in"]["var"], v_in, rtol=1e-5)
        probs.append(np.asarray(apply_jit(w), np.float64))
    np.testing.assert_allclose(np.asarray(lp), np.log(np.mean(probs, 0)), rtol=2e-5, atol=2e-5)
    # Without the refresh the stored (initial) statistics are used and predictions differ.
    lp_stale = bma.predict(apply_fn, sample_weights, x, key=key, num_samples=4, chunk_size=2)
    assert np.max(np.abs(np.asarray(lp_stale) - np.asarray(lp))) > 1e-2


def test_bad_inputs_fail_with_clear_messages(setup):
    q, x, key, _ = setup
    sw = Partial(fpbma.sample, q)
    with pytest.raises(ValueError, match="num_samples"):
        bma.predict(mlp_apply, sw, x, key=key, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        bma.predict(mlp_apply, sw, x, key=key, chunk_size=0)
    with pytest.raises(ValueError, match="mask shape"):
        bma.predict(mlp_apply, sw, x, key=key, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="no 'image'"):
        bma.predict(mlp_apply, sw, [{"x": x}], key=key)
    with pytest.raises(TypeError, match="stored samples"):
        bma.predict_samples(mlp_apply, q, x)
    with pytest.raises(ValueError, match="N >= 2"):
        bma.make_batchnorm_refresh(_BNNet(), np.ones((1, 4)), 4)


def test_repeated_calls_and_batches_compile_once(setup):
    q, x, key, _ = setup
    apply_fn, sw = Partial(mlp_apply), Partial(fpbma.sample, q)
    x2 = x[:11] * 2.0  # a shape no other test uses
    compiled = lambda: (bma._draw_chunk._cache_size(), bma._accumulate_chunk._cache_size())  # noqa: E731
    before = compiled()
    bma.predict(apply_fn, sw, x2, key=key, num_samples=3, chunk_size=2)
    after_first = compiled()
    # chunks of 2 and 1: one draw program per chunk size, one forward program per (first?, chunk size)
    assert after_first[0] - before[0] <= 2 and after_first[1] - before[1] <= 2
    # New posterior values, new key, new data of the same shapes: no recompilation.
    q2 = jax.tree.map(lambda a: a + 1.0, q)
    bma.predict(apply_fn, Partial(fpbma.sample, q2), x2 + 1.0, key=jax.random.PRNGKey(9), num_samples=3,
                chunk_size=2)
    assert compiled() == after_first


def test_eager_two_program_path_equals_the_traced_scan(setup):
    """Called eagerly, predict draws and runs forwards as separate programs; under jit it is one scan."""
    q, x, key, _ = setup
    apply_fn, sw = Partial(mlp_apply), Partial(fpbma.sample, q)
    for s, chunk in ((5, 1), (7, 3)):
        eager = bma.predict(apply_fn, sw, x, key=key, num_samples=s, chunk_size=chunk)
        traced = jax.jit(lambda xx: bma.predict(apply_fn, sw, xx, key=key, num_samples=s, chunk_size=chunk))(x)
        np.testing.assert_allclose(np.asarray(eager), np.asarray(traced), rtol=1e-6, atol=1e-6)


