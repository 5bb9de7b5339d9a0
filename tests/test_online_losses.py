"""gpd_jax.online_losses against float64 NumPy references written here from the formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpd_jax import online_losses as ol

RTOL, ATOL = 2e-5, 2e-6


def np_softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


def np_kl(p, q):
  return sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def np_entropy(p):
  return -sum(pi * np.log(pi) for pi in p if pi > 0)


def np_ce(z, y):
  return -np.log(np_softmax(z)[y])


def draw(seed, b=5, k=6, scale=2.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, k)) * scale, rng.integers(0, k, size=b)


def test_mutual_kl_two_peers():
  z, _ = draw(0)
  peers = [draw(1)[0], draw(2)[0] * 3]
  t = 2.0
  want = [np.mean([t * t * np_kl(np_softmax(p[i] / t), np_softmax(z[i] / t)) for p in peers])
          for i in range(len(z))]
  got = ol.mutual_kl(jnp.float32(z), [jnp.float32(p) for p in peers], temperature=t)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_mutual_kl_gradient_only_through_own_logits():
  z, _ = draw(0)
  peer = jnp.float32(draw(1)[0])
  g_peer = jax.grad(lambda p: ol.mutual_kl(jnp.float32(z), [p]).sum())(peer)
  assert np.all(np.asarray(g_peer) == 0)
  # d/dz KL(q || softmax(z)) = softmax(z) - q at T = 1.
  g = jax.grad(lambda a: ol.mutual_kl(a, [peer]).sum())(jnp.float32(z))
  want = np.stack([np_softmax(z[i]) - np_softmax(np.float64(peer[i])) for i in range(len(z))])
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="peer_logits"):
    ol.mutual_kl(jnp.float32(z), [])


def test_reverse_kl_and_entropy():
  z, _ = draw(3)
  o, _ = draw(4)
  t = 3.0
  want = [t * t * np_kl(np_softmax(z[i] / t), np_softmax(o[i] / t)) for i in range(len(z))]
  np.testing.assert_allclose(ol.reverse_kl(jnp.float32(z), jnp.float32(o), temperature=t), want,
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ol.entropy(jnp.float32(z), temperature=t),
                             [np_entropy(np_softmax(r / t)) for r in z], rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda b: ol.reverse_kl(jnp.float32(z), b).sum())(jnp.float32(o))
  assert np.all(np.asarray(g) == 0)


def test_balanced_kl_weights_follow_entropy_gap():
  z_s, _ = draw(5, b=8)
  z_t, _ = draw(6, b=8)
  z_t[:4] *= 0.1   # some teachers flatter than the student, some sharper
  z_s[4:] *= 0.1
  t, gain = 2.0, 3.0
  want = []
  for a, b in zip(z_s, z_t):
    ps, pt = np_softmax(a / t), np_softmax(b / t)
    fwd, rev = t * t * np_kl(pt, ps), t * t * np_kl(ps, pt)
    student_less_sure = np_entropy(ps) > np_entropy(pt)
    want.append((1 if student_less_sure else gain) * fwd + (gain if student_less_sure else 1) * rev)
  got = ol.balanced_kl(jnp.float32(z_s), jnp.float32(z_t), temperature=t, gain=gain)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="gain"):
    ol.balanced_kl(jnp.float32(z_s), jnp.float32(z_t), gain=-1.0)


def test_teacher_confidence_weights_and_multi_teacher_kd():
  z_s, y = draw(7)
  teachers = [draw(8)[0], draw(9)[0], draw(10)[0] * 0.5]
  m, t = len(teachers), 4.0
  w_want = np.zeros((len(y), m))
  loss_want = []
  for i, yi in enumerate(y):
    ce = np.array([np_ce(tk[i], yi) for tk in teachers])
    w = (1 - np.exp(ce) / np.exp(ce).sum()) / (m - 1)
    w_want[i] = w
    kd = [t * t * np_kl(np_softmax(tk[i] / t), np_softmax(z_s[i] / t)) for tk in teachers]
    loss_want.append(np.dot(w, kd) / m)
  f32 = [jnp.float32(tk) for tk in teachers]
  w = ol.teacher_confidence_weights(f32, jnp.int32(y))
  np.testing.assert_allclose(w, w_want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.sum(w, -1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ol.multi_teacher_kd(jnp.float32(z_s), f32, jnp.int32(y), temperature=t),
                             loss_want, rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match=">= 2 teachers"):
    ol.multi_teacher_kd(jnp.float32(z_s), f32[:1], jnp.int32(y))
  with pytest.raises(ValueError, match="same"):
    ol.multi_teacher_kd(jnp.float32(z_s), [f32[0], f32[1][:, :3]], jnp.int32(y))


@pytest.mark.parametrize("seed,teacher_scale,student_scale", [(11, 4.0, 0.3), (12, 0.3, 4.0), (13, 1, 1)])
def test_switch_statistics(seed, teacher_scale, student_scale):
  rng = np.random.default_rng(seed)
  k, b = 5, 6
  y = rng.integers(0, k, size=b)
  onehot = np.eye(k)[y]
  z_t = (onehot * 3 + rng.normal(size=(b, k))) * teacher_scale
  z_s = rng.normal(size=(b, k)) * student_scale
  ps = np.stack([np_softmax(r) for r in z_s])
  pt = np.stack([np_softmax(r) for r in z_t])
  gap = np.mean(np.abs(ps - pt).sum(-1))
  d_s = np.mean(np.abs(ps - onehot).sum(-1))
  d_t = np.mean(np.abs(pt - onehot).sum(-1))
  delta = d_s - np.exp(-d_t / (d_s + d_t)) * d_t
  got = ol.switch_statistics(jnp.float32(z_s), jnp.float32(z_t), jnp.int32(y))
  np.testing.assert_allclose([got["gap"], got["d_student"], got["d_teacher"], got["threshold"]],
                             [gap, d_s, d_t, delta], rtol=RTOL, atol=ATOL)
  assert bool(got["expert"]) == bool(gap > delta and d_t < d_s)


def test_switch_statistics_modes_both_occur():
  """Expert mode: the student sure of a wrong class, the teacher fairly right (its gap exceeds the
  threshold). Learning mode: a vague student next to a sure, right teacher (their gap lies along the
  labels), and any teacher further from the labels than the student."""
  y = np.zeros(4, np.int64)
  wrong_sure = np.tile([0.0, 30.0, 0.0], (4, 1))
  fairly_right = np.tile(np.log([0.6, 0.2, 0.2]), (4, 1))
  stats = ol.switch_statistics(jnp.float32(wrong_sure), jnp.float32(fairly_right), jnp.int32(y))
  np.testing.assert_allclose([stats["gap"], stats["d_student"], stats["d_teacher"]], [1.6, 2.0, 0.8],
                             rtol=1e-5)
  assert bool(stats["expert"])
  assert not bool(ol.switch_statistics(jnp.float32(fairly_right), jnp.float32(wrong_sure),
                                       jnp.int32(y))["expert"])
  vague, sure = np.zeros((4, 3)), np.tile([8.0, 0.0, 0.0], (4, 1))
  assert not bool(ol.switch_statistics(jnp.float32(vague), jnp.float32(sure), jnp.int32(y))["expert"])
