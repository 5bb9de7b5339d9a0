"""gpd_jax.terms: parsing of the term strings, the weighted sum, and per-network gradients."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gpd_jax import terms as terms_lib

NETS = ("student", "teacher", "peer", "peer2", "t1", "t2")
ONLINE = ml_collections.ConfigDict({"temperature": 2.0, "bdkd_gain": 3.0, "camkd_temperature": 4.0})


def np_softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


def np_kl(p, q):
  return float(np.sum(p * (np.log(p) - np.log(q))))


def test_parse_terms():
  parsed = terms_lib.parse_terms(
      ["ce(peer)", "0.5*dml(student<->peer)", "camkd(student<-t1, t2)", "2e-1 * bdkd(peer2<-teacher)"],
      NETS)
  assert parsed == (
      terms_lib.Term("ce", "peer", (), 1.0),
      terms_lib.Term("dml", "student", ("peer",), 0.5),
      terms_lib.Term("dml", "peer", ("student",), 0.5),
      terms_lib.Term("camkd", "student", ("t1", "t2"), 1.0),
      terms_lib.Term("bdkd", "peer2", ("teacher",), 0.2))
  assert [t.key for t in parsed][:2] == ["ce_peer", "dml_student_from_peer"]


@pytest.mark.parametrize("spec,match", [
    ("dml(student<->nobody)", "network 'nobody'"),
    ("frob(student<-peer)", "unknown loss"),
    ("kd(student)", "'ce' takes only a target"),
    ("ce(student<-peer)", "'ce' takes only a target"),
    ("kd(student<-student)", "from itself"),
    ("camkd(student<-t1)", ">= 2 teachers"),
    ("kd(student<-t1,t2)", "takes one source"),
    ("kd(student<->peer)", "two-network dml"),
    ("dml student peer", "cannot read"),
])
def test_parse_terms_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    terms_lib.parse_terms([spec], NETS)
  with pytest.raises(ValueError, match="appear more than once"):
    terms_lib.parse_terms(["ce(peer)", "ce(peer)"], NETS)
  with pytest.raises(ValueError, match="list of strings"):
    terms_lib.parse_terms("ce(peer)", NETS)


def test_objective_sum_and_per_network_gradients():
  """The total is the weighted sum of terms computed here in NumPy; each network's gradient is the
  gradient of its own terms only (the sources carry no gradient)."""
  rng = np.random.default_rng(0)
  b, k = 4, 5
  logits = {n: rng.normal(size=(b, k)) * 2 for n in NETS}
  y = rng.integers(0, k, size=b)
  parsed = terms_lib.parse_terms(["ce(peer)", "0.5*dml(student<->peer)", "0.3*kd(student<-teacher)"],
                                 NETS)
  objective = terms_lib.make_terms_objective(parsed, ONLINE)
  t = 2.0
  ce_peer = np.mean([-np.log(np_softmax(logits["peer"][i])[y[i]]) for i in range(b)])
  def kd(dst, src):
    return np.mean([t * t * np_kl(np_softmax(logits[src][i] / t), np_softmax(logits[dst][i] / t))
                    for i in range(b)])
  want = ce_peer + 0.5 * kd("student", "peer") + 0.5 * kd("peer", "student") + 0.3 * kd("student", "teacher")
  f32 = {n: jnp.float32(v) for n, v in logits.items()}
  total, metrics = objective(f32, jnp.int32(y))
  np.testing.assert_allclose(total, want, rtol=2e-5)
  np.testing.assert_allclose(metrics["dml_peer_from_student"], kd("peer", "student"), rtol=2e-5)
  assert "acc_peer" in metrics and "acc_student" not in metrics

  grads = jax.grad(lambda z: objective(z, jnp.int32(y))[0])(f32)
  own_student = jax.grad(lambda s: 0.5 * jnp.mean(terms_lib.online_losses.mutual_kl(
      s, [f32["peer"]], temperature=t)) + 0.3 * jnp.mean(terms_lib.losses.kd(
          s, f32["teacher"], temperature=t)))(f32["student"])
  np.testing.assert_allclose(grads["student"], own_student, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(grads["teacher"]) == 0)
  assert np.all(np.asarray(grads["t1"]) == 0)
