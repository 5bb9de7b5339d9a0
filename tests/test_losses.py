"""Tests for gpd_jax.losses and gpd_jax.objective.

Golden values come from independent float64 NumPy reference implementations written
here with plain formulas and explicit loops (they never call the library). Inputs are
tiny (B <= 6, K <= 7) so the whole file runs in a few seconds on CPU.
"""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gpd_jax import losses
from gpd_jax import objective as objective_lib

RTOL, ATOL = 2e-5, 2e-5


# ----------------------------------------------------------------------------------
# Independent NumPy references (float64, straightforward formulas)
# ----------------------------------------------------------------------------------

def np_softmax(v):
  v = np.asarray(v, np.float64)
  e = np.exp(v - v.max())
  return e / e.sum()


def np_kl(p, q):
  return sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_ce(z, y, ls=0.0):
  out = []
  for zi, yi in zip(z, y):
    k = len(zi)
    p = np_softmax(zi)
    q = np.full(k, ls / k)
    q[yi] += 1.0 - ls
    out.append(-sum(q[c] * np.log(p[c]) for c in range(k)))
  return np.array(out)


def ref_soft_ce(z, q):
  return np.array([-sum(qi[c] * np.log(np_softmax(zi)[c]) for c in range(len(zi)))
                   for zi, qi in zip(z, q)])


def ref_kd(zs, zt, t):
  return np.array([t * t * np_kl(np_softmax(b / t), np_softmax(a / t))
                   for a, b in zip(zs, zt)])


def ref_tckd_nckd(zs, zt, y, t):
  """Per-sample (TCKD, NCKD), each T²-scaled, from explicit probabilities."""
  tckd, nckd = [], []
  for a, b, yi in zip(zs, zt, y):
    ps, pt = np_softmax(a / t), np_softmax(b / t)
    bs, bt = [ps[yi], 1 - ps[yi]], [pt[yi], 1 - pt[yi]]
    hs = np_softmax(np.delete(a, yi) / t)
    ht = np_softmax(np.delete(b, yi) / t)
    tckd.append(t * t * np_kl(bt, bs))
    nckd.append(t * t * np_kl(ht, hs))
  return np.array(tckd), np.array(nckd)


def ref_dkd(zs, zt, y, alpha, beta, t):
  tckd, nckd = ref_tckd_nckd(zs, zt, y, t)
  return alpha * tckd + beta * nckd


def np_pearson(u, v, eps=1e-8):
  u = u - u.mean()
  v = v - v.mean()
  return (u * v).sum() / (np.sqrt((u * u).sum()) * np.sqrt((v * v).sum()) + eps)


def ref_dist(zs, zt, beta, gamma, t):
  ys = np.stack([np_softmax(r / t) for r in zs])
  yt = np.stack([np_softmax(r / t) for r in zt])
  b, k = ys.shape
  inter = np.array([1 - np_pearson(ys[i], yt[i]) for i in range(b)])
  intra = 1 - np.mean([np_pearson(ys[:, j], yt[:, j]) for j in range(k)])
  return t * t * (beta * inter + gamma * intra)


def ref_acc(z, y):
  return float(np.mean(np.argmax(z, axis=1) == y))


# ----------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------

B, K = 6, 7


def make_logits(seed, scale=2.0, shape=(B, K)):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


LABELS = np.array([0, 3, 6, 2, 2, 5], np.int32)
ZS, ZT, ZD = make_logits(0), make_logits(1, 3.0), make_logits(2, 2.5)


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------
# Golden values
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ls", [0.0, 0.1, 0.5])
def test_cross_entropy_golden(ls):
  out = losses.cross_entropy(ZS, LABELS, label_smoothing=ls)
  chex.assert_shape(out, (B,))
  chex.assert_type(out, jnp.float32)
  close(out, ref_ce(ZS.astype(np.float64), LABELS, ls))


def test_cross_entropy_bfloat16_is_upcast():
  out = losses.cross_entropy(jnp.asarray(ZS, jnp.bfloat16), LABELS)
  chex.assert_type(out, jnp.float32)
  zb = np.asarray(jnp.asarray(ZS, jnp.bfloat16).astype(jnp.float32), np.float64)
  close(out, ref_ce(zb, LABELS))


def test_soft_cross_entropy_golden():
  q = np.stack([np_softmax(r) for r in ZT])
  out = losses.soft_cross_entropy(ZS, q.astype(np.float32))
  chex.assert_shape(out, (B,))
  close(out, ref_soft_ce(ZS, q))


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_golden(t):
  out = losses.kd(ZS, ZT, temperature=t)
  chex.assert_shape(out, (B,))
  close(out, ref_kd(ZS, ZT, t))


@pytest.mark.parametrize("alpha,beta,t", [(1.0, 0.5, 1.0), (1.0, 8.0, 4.0), (0.3, 2.0, 2.0)])
def test_dkd_golden(alpha, beta, t):
  out = losses.dkd(ZS, ZT, LABELS, alpha=alpha, beta=beta, temperature=t)
  chex.assert_shape(out, (B,))
  close(out, ref_dkd(ZS, ZT, LABELS, alpha, beta, t))


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_equals_tckd_plus_weighted_nckd(t):
  """Per sample: KD = TCKD + (1 - p_t,y)·NCKD (docs/kd_methods.md §4)."""
  tckd = losses.dkd(ZS, ZT, LABELS, alpha=1.0, beta=0.0, temperature=t)
  nckd = losses.dkd(ZS, ZT, LABELS, alpha=0.0, beta=1.0, temperature=t)
  pt_y = np.array([np_softmax(r / t)[y] for r, y in zip(ZT, LABELS)])
  rhs = np.asarray(tckd, np.float64) + (1 - pt_y) * np.asarray(nckd, np.float64)
  close(losses.kd(ZS, ZT, temperature=t), rhs)
  # The sum at alpha = beta = 1 is DKD, not KD (NCKD is not weighted down).
  both = losses.dkd(ZS, ZT, LABELS, alpha=1.0, beta=1.0, temperature=t)
  close(both, np.asarray(tckd) + np.asarray(nckd))


def test_dkd_stable_for_confident_logits():
  """Logit gaps of ~1000: naive log(softmax) gives inf/NaN, the stable form does not."""
  def _vg(s, t, y, temperature):
    fn = lambda s: jnp.mean(losses.dkd(s, t, y, alpha=1.0, beta=1.0,
                                       temperature=temperature))
    return jax.value_and_grad(fn)(s)

  vg = jax.jit(_vg, static_argnums=3)
  y0 = np.array([0], np.int32)
  # Analytic: teacher uniform over 3 classes, student target logit at -1000.
  # TCKD = 1/3·(log 1/3 + 1000 + log 2) + 2/3·log(2/3); NCKD = 0 (both uniform).
  val, grad = vg(np.array([[-1000.0, 0.0, 0.0]], np.float32), np.zeros((1, 3), np.float32),
                 y0, 1.0)
  chex.assert_tree_all_finite(grad)
  close(val, 1000.0 / 3 + np.log(2.0 / 3), rtol=1e-6)
  # Teacher almost one-hot on the label (1 - p_t,y underflows to 0 in float32).
  # TCKD ≈ -log p_s,y = 1000 - 0; NCKD ≈ -log p̂_s,1 = 1000 - 5.
  val, grad = vg(np.array([[0.0, 5.0, 1000.0]], np.float32),
                 np.array([[1000.0, 0.0, -1000.0]], np.float32), y0, 1.0)
  chex.assert_tree_all_finite(grad)
  close(val, 1995.0, rtol=1e-6)
  # Random logits with gaps of thousands, labels random or the teacher's argmax.
  big_s, big_t = make_logits(3, 1000.0), make_logits(4, 1000.0)
  for y in (LABELS, np.argmax(big_t, 1).astype(np.int32)):
    for t in (1.0, 4.0):
      chex.assert_tree_all_finite(vg(big_s, big_t, y, t))


@pytest.mark.parametrize("beta,gamma,t", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_golden(beta, gamma, t):
  out = losses.dist(ZS, ZT, beta=beta, gamma=gamma, temperature=t)
  chex.assert_shape(out, (B,))
  close(out, ref_dist(ZS, ZT, beta, gamma, t))


def test_dist_properties():
  # Vanishes for identical logits; invariant to a per-row constant shift.
  dist = jax.jit(losses.dist)
  close(dist(ZS, ZS), np.zeros(B), atol=1e-6)
  shift = np.arange(B, dtype=np.float32)[:, None] * 10.0
  close(dist(ZS + shift, ZT), np.asarray(dist(ZS, ZT)), rtol=1e-5)
  # Degenerate batch of one: finite value and gradient (centred column is exactly 0).
  val, grad = jax.jit(jax.value_and_grad(lambda s: losses.dist(s, ZT[:1]).sum()))(ZS[:1])
  chex.assert_tree_all_finite((val, grad))


def test_gpd_sce_is_smoothed_soft_ce():
  p = np.stack([np_softmax(r) for r in ZD])
  for a in (0.1, 0.3):
    out = losses.gpd_sce(ZS, ZD, smoothing=a)
    chex.assert_shape(out, (B,))
    close(out, ref_soft_ce(ZS, (1 - a) * p + a / K))
    # Same as the reference code's split form (docs/kd_methods.md §4).
    split = ((1 - a) * ref_soft_ce(ZS, p)
             + a * np.array([np.mean(-np.log(np_softmax(r))) for r in ZS]))
    close(out, split)
  close(losses.gpd_sce(ZS, ZD), ref_soft_ce(ZS, 0.9 * p + 0.1 / K))  # default 0.1


def test_teacher_side_gradients_are_exactly_zero():
  cases = {
      "sce": lambda s, t: losses.gpd_sce(s, t).sum(),
      "kd": lambda s, t: losses.kd(s, t, temperature=4.0).sum(),
      "dkd": lambda s, t: losses.dkd(s, t, LABELS, alpha=1.0, beta=2.0,
                                     temperature=2.0).sum(),
      "dist": lambda s, t: losses.dist(s, t, temperature=2.0).sum(),
      "soft_ce": lambda s, t: losses.soft_cross_entropy(s, jax.nn.softmax(t)).sum(),
  }
  for name, fn in cases.items():
    g_s, g_t = jax.jit(jax.grad(fn, argnums=(0, 1)))(ZS, ZT)
    assert np.all(np.asarray(g_t) == 0.0), name
    assert np.abs(np.asarray(g_s)).max() > 1e-4, name  # the student side does learn


def test_metrics():
  z = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 3.0], [0.0, 1.0, 0.5]], np.float32)
  y = np.array([1, 1, 0], np.int32)
  top1 = losses.top_k_correct(z, y, 1)
  top2 = losses.top_k_correct(z, y, 2)
  chex.assert_shape((top1, top2), (3,))
  np.testing.assert_array_equal(top1, [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(top2, [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(losses.top_k_correct(z, y, 3), [1.0, 1.0, 1.0])
  z2 = np.array([[0.0, 2.0, 1.0], [5.0, 1.0, 3.0], [0.0, 0.0, 9.0]], np.float32)
  agree = losses.agreement(z, z2)
  chex.assert_shape(agree, (3,))
  np.testing.assert_array_equal(agree, [1.0, 0.0, 0.0])
  close(np.mean(losses.top_k_correct(ZS, LABELS, 1)), ref_acc(ZS, LABELS))


@pytest.mark.parametrize("call,arg", [
    (lambda: losses.kd(ZS, ZT, temperature=0.0), "temperature"),
    (lambda: losses.dkd(ZS, ZT, LABELS, alpha=1.0, beta=1.0, temperature=-1.0),
     "temperature"),
    (lambda: losses.dkd(ZS, ZT, LABELS, alpha=-1.0, beta=1.0, temperature=1.0), "alpha"),
    (lambda: losses.dist(ZS, ZT, temperature=0.0), "temperature"),
    (lambda: losses.dist(ZS, ZT, eps=0.0), "eps"),
    (lambda: losses.cross_entropy(ZS, LABELS, label_smoothing=1.5), "label_smoothing"),
    (lambda: losses.gpd_sce(ZS, ZD, smoothing=-0.1), "smoothing"),
    (lambda: losses.top_k_correct(ZS, LABELS, 0), "k"),
    (lambda: losses.kd(ZS, ZT[:, :3], temperature=1.0), "teacher_logits"),
])
def test_invalid_arguments_raise(call, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    call()


# ----------------------------------------------------------------------------------
# Objective builder
# ----------------------------------------------------------------------------------

def loss_cfg(base="dkd", ce_weight=1.0, kd_weight=1.0, label_smoothing=0.0, warmup_steps=0):
  return ml_collections.ConfigDict(dict(
      base=base, ce_weight=ce_weight, kd_weight=kd_weight, label_smoothing=label_smoothing,
      kd=dict(temperature=4.0),
      dkd=dict(alpha=1.0, beta=0.5, temperature=2.0, warmup_steps=warmup_steps),
      dist=dict(beta=1.0, gamma=2.0, temperature=1.0)))


def gpd_cfg(enabled=True, train_dt_loss=True, dt_uses_static_kd=True,
            student_uses_static_kd=True):
  return ml_collections.ConfigDict(dict(
      enabled=enabled, sce_weight=3.0, sce_smoothing=0.1, train_dt_loss=train_dt_loss,
      dt_uses_static_kd=dt_uses_static_kd, student_uses_static_kd=student_uses_static_kd))


def run(obj, logits, step=0):
  total, terms = jax.jit(obj)(logits, LABELS, step=step)  # jit cache keyed on obj
  chex.assert_shape(total, ())
  close(total, float(terms["total"]), rtol=0, atol=0)
  return float(total), {k: float(v) for k, v in terms.items()}


def assert_terms(terms, expected):
  assert set(terms) == set(expected), (sorted(terms), sorted(expected))
  for k, v in expected.items():
    close(terms[k], v, rtol=1e-5, atol=1e-5)


P_D = np.stack([np_softmax(r) for r in ZD])
SCE = ref_soft_ce(ZS, 0.9 * P_D + 0.1 / K).mean()


def test_objective_gpd_dkd_with_teacher():  # scenario (a)
  obj = objective_lib.make_objective(loss_cfg("dkd", ce_weight=1.0, kd_weight=0.7,
                                              label_smoothing=0.1), gpd_cfg())
  _, terms = run(obj, {"student": ZS, "dt": ZD, "teacher": ZT}, step=3)
  ce_s, ce_d = ref_ce(ZS, LABELS, 0.1).mean(), ref_ce(ZD, LABELS, 0.1).mean()
  kd_s = ref_dkd(ZS, ZT, LABELS, 1.0, 0.5, 2.0).mean()
  kd_d = ref_dkd(ZD, ZT, LABELS, 1.0, 0.5, 2.0).mean()
  total = (ce_d + 0.7 * kd_d) + (ce_s + 0.7 * kd_s + 3.0 * SCE)
  assert_terms(terms, dict(ce_S=ce_s, kd_S=kd_s, sce_S=SCE, ce_D=ce_d, kd_D=kd_d,
                           total=total, acc_S=ref_acc(ZS, LABELS),
                           acc_D=ref_acc(ZD, LABELS)))


def test_objective_gpd_from_scratch():  # scenarios (b)/(c): no static teacher
  obj = objective_lib.make_objective(loss_cfg("ce", ce_weight=0.5), gpd_cfg())
  _, terms = run(obj, {"student": ZS, "dt": ZD})
  ce_s, ce_d = ref_ce(ZS, LABELS).mean(), ref_ce(ZD, LABELS).mean()
  assert_terms(terms, dict(ce_S=ce_s, sce_S=SCE, ce_D=ce_d,
                           total=0.5 * ce_d + 0.5 * ce_s + 3.0 * SCE,
                           acc_S=ref_acc(ZS, LABELS), acc_D=ref_acc(ZD, LABELS)))


@pytest.mark.parametrize("gpd", [None, gpd_cfg(enabled=False)])
def test_objective_plain_kd(gpd):
  obj = objective_lib.make_objective(loss_cfg("kd", ce_weight=0.1, kd_weight=0.9), gpd)
  _, terms = run(obj, {"student": ZS, "teacher": ZT})
  ce_s, kd_s = ref_ce(ZS, LABELS).mean(), ref_kd(ZS, ZT, 4.0).mean()
  assert_terms(terms, dict(ce_S=ce_s, kd_S=kd_s, total=0.1 * ce_s + 0.9 * kd_s,
                           acc_S=ref_acc(ZS, LABELS)))


def test_objective_plain_dist():
  obj = objective_lib.make_objective(loss_cfg("dist", kd_weight=2.0))
  _, terms = run(obj, {"student": ZS, "teacher": ZT})
  ce_s, kd_s = ref_ce(ZS, LABELS).mean(), ref_dist(ZS, ZT, 1.0, 2.0, 1.0).mean()
  assert_terms(terms, dict(ce_S=ce_s, kd_S=kd_s, total=ce_s + 2.0 * kd_s,
                           acc_S=ref_acc(ZS, LABELS)))


def test_objective_plain_ce():
  obj = objective_lib.make_objective(loss_cfg("ce", ce_weight=2.0, label_smoothing=0.2))
  _, terms = run(obj, {"student": ZS})
  ce_s = ref_ce(ZS, LABELS, 0.2).mean()
  assert_terms(terms, dict(ce_S=ce_s, total=2.0 * ce_s, acc_S=ref_acc(ZS, LABELS)))
  # A teacher's logits are ignored by the 'ce' base.
  _, terms_t = run(obj, {"student": ZS, "teacher": ZT})
  assert terms_t == terms


def test_objective_gpd_switches():
  logits = {"student": ZS, "dt": ZD, "teacher": ZT}
  _, full = run(objective_lib.make_objective(loss_cfg(), gpd_cfg()), logits)
  _, no_kd_d = run(objective_lib.make_objective(
      loss_cfg(), gpd_cfg(dt_uses_static_kd=False)), logits)
  assert set(full) - set(no_kd_d) == {"kd_D"}
  for k in no_kd_d:
    if k != "total":
      assert no_kd_d[k] == full[k], k
  close(no_kd_d["total"], full["total"] - full["kd_D"], rtol=1e-6)

  _, no_kd_s = run(objective_lib.make_objective(
      loss_cfg(), gpd_cfg(student_uses_static_kd=False)), logits)
  assert set(full) - set(no_kd_s) == {"kd_S"}
  close(no_kd_s["total"], full["total"] - full["kd_S"], rtol=1e-6)

  _, no_ld = run(objective_lib.make_objective(
      loss_cfg(), gpd_cfg(train_dt_loss=False)), logits)
  assert set(full) - set(no_ld) == {"ce_D", "kd_D"}
  close(no_ld["total"], full["total"] - full["ce_D"] - full["kd_D"], rtol=1e-6)


def test_objective_gradients_respect_stop_gradient():
  """d total / d z_D comes from L_D only (SCE is detached); z_T gets no gradient."""
  obj = objective_lib.make_objective(loss_cfg(), gpd_cfg())
  fn = lambda s, d, t: obj({"student": s, "dt": d, "teacher": t}, LABELS, step=0)[0]
  g_s, g_d, g_t = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(ZS, ZD, ZT)
  l_d = lambda d: (losses.cross_entropy(d, LABELS).mean()
                   + losses.dkd(d, ZT, LABELS, alpha=1.0, beta=0.5, temperature=2.0).mean())
  close(g_d, np.asarray(jax.jit(jax.grad(l_d))(ZD)), rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(g_t) == 0.0)
  assert np.abs(np.asarray(g_s)).max() > 1e-4


def test_objective_dkd_warmup():
  obj = objective_lib.make_objective(loss_cfg("dkd", kd_weight=0.7, warmup_steps=10),
                                     gpd_cfg())
  logits = {"student": ZS, "dt": ZD, "teacher": ZT}
  for step, factor in [(0, 0.0), (5, 0.5), (10, 1.0), (25, 1.0)]:
    total, t = run(obj, logits, step=step)
    rest = t["ce_S"] + t["ce_D"] + 3.0 * t["sce_S"]
    close(total, rest + 0.7 * factor * (t["kd_S"] + t["kd_D"]), rtol=1e-6)
    close(t["kd_S"], ref_dkd(ZS, ZT, LABELS, 1.0, 0.5, 2.0).mean())  # unweighted


def test_objective_config_errors():
  with pytest.raises(ValueError, match=r"config\.loss\.base.*ce, kd, dkd, dist"):
    objective_lib.make_objective(loss_cfg("crd"))
  cfg = loss_cfg("kd")
  cfg.kd.temperature = 0.0
  with pytest.raises(ValueError, match=r"config\.loss\.kd\.temperature"):
    objective_lib.make_objective(cfg)
  obj = objective_lib.make_objective(loss_cfg("dkd"), gpd_cfg())
  with pytest.raises(ValueError, match=r"config\.teacher"):
    obj({"student": ZS, "dt": ZD}, LABELS, step=0)
  with pytest.raises(ValueError, match="'dt'"):
    obj({"student": ZS, "teacher": ZT}, LABELS, step=0)
