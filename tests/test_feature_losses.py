"""Tests for gpd_jax.feature_losses.

Golden values come from float64 NumPy references written here from the published formulas and
PyTorch's documented operator semantics (adaptive pooling bins, 'nearest' upsampling, transposed
convs), with plain loops; they never call the library. Inputs are tiny.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpd_jax import feature_losses as fl
from gpd_jax.models import layers

RTOL, ATOL = 1e-5, 1e-6


def rng(seed):
  return np.random.default_rng(seed)


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------


def np_adaptive_pool(x, out):
  """[B, H, W, C] -> [B, out, out, C]; cell i averages [floor(i·H/out), ceil((i+1)·H/out))."""
  b, h, w, c = x.shape
  y = np.zeros((b, out, out, c))
  for i in range(out):
    h0, h1 = (i * h) // out, math.ceil((i + 1) * h / out)
    for j in range(out):
      w0, w1 = (j * w) // out, math.ceil((j + 1) * w / out)
      y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return y


def np_mse(a, b):
  return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def np_hcl(fs_list, ft_list):
  total = 0.0
  for fs, ft in zip(fs_list, ft_list):
    fs, ft = np.asarray(fs, np.float64), np.asarray(ft, np.float64)
    h = fs.shape[1]
    loss, cnt, tot = np_mse(fs, ft), 1.0, 1.0
    for l in (4, 2, 1):
      if l >= h:
        continue
      cnt /= 2.0
      loss += np_mse(np_adaptive_pool(fs, l), np_adaptive_pool(ft, l)) * cnt
      tot += cnt
    total += loss / tot
  return total


def np_sp(fs, ft):
  b = fs.shape[0]
  fs, ft = np.asarray(fs, np.float64).reshape(b, -1), np.asarray(ft, np.float64).reshape(b, -1)

  def norm_gram(f):
    g = f @ f.T
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)

  d = norm_gram(ft) - norm_gram(fs)
  return float(np.sum(d * d) / (b * b))


def np_conv(x, kernel, stride=1, pad=0):
  """NHWC conv with an HWIO kernel (plain loops over the kernel taps)."""
  kh, kw = kernel.shape[:2]
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      y += patch @ kernel[i, j]
  return y


def np_bn_eval(x, p, s, eps=1e-5):
  return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def np_upsample_nearest(y, h, w):
  rows = [(i * y.shape[1]) // h for i in range(h)]
  cols = [(j * y.shape[2]) // w for j in range(w)]
  return y[:, rows][:, :, cols]


def np_abf(x, residual, params, stats):
  """ABF in eval mode from its formula: returns (out, mixed)."""
  to64 = lambda t: {k: np.asarray(v, np.float64) for k, v in t.items()}
  x = np.asarray(x, np.float64)
  x = np_conv(x, np.asarray(params["conv1"]["kernel"], np.float64))
  x = np_bn_eval(x, to64(params["bn1"]), to64(stats["bn1"]))
  if residual is not None:
    y = np_upsample_nearest(np.asarray(residual, np.float64), x.shape[1], x.shape[2])
    z = np_conv(np.concatenate([x, y], -1), np.asarray(params["att_conv"]["kernel"], np.float64))
    z = 1 / (1 + np.exp(-(z + np.asarray(params["att_conv"]["bias"], np.float64))))
    x = x * z[..., :1] + y * z[..., 1:]
  out = np_conv(x, np.asarray(params["conv2"]["kernel"], np.float64), pad=1)
  return np_bn_eval(out, to64(params["bn2"]), to64(stats["bn2"])), x


def randomise_bn(variables, seed):
  """Random BN affine and statistics, so that eval-mode BN is far from the identity."""
  r = rng(seed)

  def fill(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "var":
      return jnp.asarray(r.uniform(0.5, 2.0, a.shape), a.dtype)
    if name in ("mean", "bias") and "att_conv" not in str(path):
      return jnp.asarray(0.3 * r.normal(size=a.shape), a.dtype)
    if name == "scale":
      return jnp.asarray(r.uniform(0.5, 1.5, a.shape), a.dtype)
    return a

  return jax.tree_util.tree_map_with_path(fill, variables)


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, out", [(7, 4), (7, 2), (7, 1), (5, 3), (8, 4), (14, 4), (3, 3)])
def test_adaptive_avg_pool(size, out):
  x = rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  got = fl.adaptive_avg_pool(jnp.asarray(x), (out, out))
  close(got, np_adaptive_pool(x.astype(np.float64), out))


@pytest.mark.parametrize("size", [(14, 10), (7, 5), (9, 11), (3, 2), (1, 1)])
def test_upsample_nearest(size):
  """Output (i, j) reads input (floor(i·H/h), floor(j·W/w)) (PyTorch's 'nearest')."""
  x = rng(1).normal(size=(2, 7, 5, 3)).astype(np.float32)
  got = np.asarray(fl.upsample_nearest(jnp.asarray(x), size))
  assert got.shape == (2, *size, 3)
  for i in range(size[0]):
    for j in range(size[1]):
      np.testing.assert_array_equal(got[:, i, j], x[:, (i * 7) // size[0], (j * 5) // size[1]])


# ---------------------------------------------------------------------------------------------
# ReviewKD
# ---------------------------------------------------------------------------------------------


def test_hcl_loss_matches_numpy():
  """Levels of heights 7, 4, 2, 1: every branch of the k < H rule (4,2,1 / 2,1 / 1 / none)."""
  r = rng(2)
  shapes = [(3, 7, 7, 4), (3, 4, 4, 5), (3, 2, 2, 6), (3, 1, 1, 8)]
  fs = [r.normal(size=s).astype(np.float32) for s in shapes]
  ft = [r.normal(size=s).astype(np.float32) for s in shapes]
  got = fl.hcl_loss([jnp.asarray(a) for a in fs], [jnp.asarray(a) for a in ft])
  assert got.shape == ()
  close(got, np_hcl(fs, ft))
  # One level alone (H = 4): (mse + mse_2/2 + mse_1/4) / 1.75, written out.
  expected = (np_mse(fs[1], ft[1]) + np_mse(np_adaptive_pool(fs[1], 2), np_adaptive_pool(ft[1], 2)) / 2
              + np_mse(np_adaptive_pool(fs[1], 1), np_adaptive_pool(ft[1], 1)) / 4) / 1.75
  close(fl.hcl_loss([fs[1]], [ft[1]]), expected)


def test_hcl_gradient_reaches_the_student_only():
  r = rng(3)
  fs = jnp.asarray(r.normal(size=(2, 4, 4, 3)), jnp.float32)
  ft = jnp.asarray(r.normal(size=(2, 4, 4, 3)), jnp.float32)
  g_s, g_t = jax.grad(lambda a, b: fl.hcl_loss([a], [b]), argnums=(0, 1))(fs, ft)
  assert float(jnp.max(jnp.abs(g_s))) > 0
  assert not np.any(np.asarray(g_t))


def test_hcl_rejects_mismatched_levels():
  a = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match=r"teacher_levels\[0\]"):
    fl.hcl_loss([a], [jnp.zeros((2, 4, 4, 6))])
  with pytest.raises(ValueError, match="levels"):
    fl.hcl_loss([a, a], [a])


@pytest.mark.parametrize("fuse", [False, True])
def test_abf_matches_numpy(fuse):
  """One ABF in eval mode (random BN statistics) against its formula, residual 2× upsampled."""
  r = rng(4)
  x = jnp.asarray(r.normal(size=(2, 4, 4, 5)), jnp.float32)
  residual = jnp.asarray(r.normal(size=(2, 2, 2, 6)), jnp.float32) if fuse else None
  abf = fl.ABF(mid_features=6, out_features=7, fuse=fuse)
  variables = randomise_bn(abf.init(jax.random.key(0), x, residual, train=False), 5)
  if fuse:  # a non-trivial attention bias
    variables["params"]["att_conv"]["bias"] = jnp.asarray([0.3, -0.2], jnp.float32)
  out, mixed = abf.apply(variables, x, residual, train=False)
  ref_out, ref_mixed = np_abf(x, residual, variables["params"], variables["batch_stats"])
  assert out.shape == (2, 4, 4, 7) and mixed.shape == (2, 4, 4, 6)
  close(out, ref_out, atol=1e-5)
  close(mixed, ref_mixed, atol=1e-5)
  assert ("att_conv" in variables["params"]) == fuse


def test_abf_init_follows_the_reference():
  """conv1/conv2: kaiming_uniform(a=1) = U(±sqrt(3/fan_in)); att_conv: PyTorch's default
  U(±1/sqrt(fan_in)) for the kernel and the bias; BN: scale 1, bias 0."""
  x = jnp.zeros((1, 4, 4, 64))
  params = fl.ABF(mid_features=32, out_features=48, fuse=True).init(
      jax.random.key(1), x, jnp.zeros((1, 2, 2, 32)), train=False)["params"]
  for name, fan_in, bound in (("conv1", 64, math.sqrt(3 / 64)), ("conv2", 9 * 32, math.sqrt(3 / 288)),
                              ("att_conv", 64, 1 / 8)):
    w = np.asarray(params[name]["kernel"])
    assert np.max(np.abs(w)) <= bound and np.max(np.abs(w)) > 0.9 * bound, name
    close(np.std(w), bound / math.sqrt(3), rtol=0.15)
  b = np.asarray(params["att_conv"]["bias"])
  assert np.all(np.abs(b) <= 1 / 8) and np.any(b != 0)
  assert np.all(np.asarray(params["bn2"]["scale"]) == 1) and np.all(np.asarray(params["bn2"]["bias"]) == 0)


def test_reviewkd_fusion_runs_deepest_first():
  """Three levels (8×8, 4×4, pooled 1×1) against a NumPy chain of ABFs, deepest first."""
  r = rng(6)
  levels = [jnp.asarray(r.normal(size=s), jnp.float32)
            for s in ((2, 8, 8, 3), (2, 4, 4, 5), (2, 1, 1, 5))]
  fusion = fl.ReviewKDFusion(out_features=(4, 6, 6), mid_features=5)
  variables = randomise_bn(fusion.init(jax.random.key(2), levels, train=False), 7)
  fused = fusion.apply(variables, levels, train=False)
  assert [tuple(f.shape) for f in fused] == [(2, 8, 8, 4), (2, 4, 4, 6), (2, 1, 1, 6)]
  assert set(variables["params"]) == {"abf0", "abf1", "abf2"}
  assert "att_conv" not in variables["params"]["abf2"] and "att_conv" in variables["params"]["abf0"]
  p, s = variables["params"], variables["batch_stats"]
  out2, res = np_abf(levels[2], None, p["abf2"], s["abf2"])
  out1, res = np_abf(levels[1], res, p["abf1"], s["abf1"])
  out0, _ = np_abf(levels[0], res, p["abf0"], s["abf0"])
  for got, ref in zip(fused, (out0, out1, out2)):
    close(got, ref, atol=1e-5)
  with pytest.raises(ValueError, match="out_features"):
    fusion.apply(variables, levels[:2], train=False)


def test_review_levels_and_mid_features():
  stages = tuple(jnp.full((2, 4 // (i + 1), 4 // (i + 1), 3), float(i)) for i in range(2))
  feats = layers.Features(stem=jnp.zeros((2, 8, 8, 3)), preact_stem=jnp.zeros((2, 8, 8, 3)),
                          stages=stages, preact_stages=tuple(-s for s in stages),
                          pooled=jnp.arange(6.0).reshape(2, 3))
  post, pre = fl.review_levels(feats, preact=False), fl.review_levels(feats, preact=True)
  assert len(post) == 3 and post[0] is stages[0] and pre[1] is feats.preact_stages[1]
  assert post[2].shape == (2, 1, 1, 3)
  close(post[2][:, 0, 0], np.arange(6.0).reshape(2, 3))
  assert fl.reviewkd_mid_features(256) == 256 and fl.reviewkd_mid_features(2048) == 512


# ---------------------------------------------------------------------------------------------
# SP
# ---------------------------------------------------------------------------------------------


def test_sp_loss_matches_numpy():
  r = rng(8)
  fs = r.normal(size=(6, 3, 3, 4)).astype(np.float32)
  ft = r.normal(size=(6, 2, 2, 9)).astype(np.float32)  # other width and size: Gram matrices are B×B
  close(fl.sp_loss(jnp.asarray(fs), jnp.asarray(ft)), np_sp(fs, ft))
  # groups=2: the mean of the two half-batch losses.
  close(fl.sp_loss(jnp.asarray(fs), jnp.asarray(ft), groups=2),
        (np_sp(fs[:3], ft[:3]) + np_sp(fs[3:], ft[3:])) / 2)
  # Row-normalised Gram matrices do not see a positive rescaling of the features.
  close(fl.sp_loss(jnp.asarray(fs), jnp.asarray(2.5 * fs)), 0.0, atol=1e-7)


def test_sp_gradient_and_errors():
  r = rng(9)
  fs, ft = (jnp.asarray(r.normal(size=(4, 5)), jnp.float32) for _ in range(2))
  g_s, g_t = jax.grad(fl.sp_loss, argnums=(0, 1))(fs, ft)
  assert float(jnp.max(jnp.abs(g_s))) > 0 and not np.any(np.asarray(g_t))
  with pytest.raises(ValueError, match="groups"):
    fl.sp_loss(fs, ft, groups=3)
  with pytest.raises(ValueError, match="teacher_feature"):
    fl.sp_loss(fs, ft[:2])


# ---------------------------------------------------------------------------------------------
# FitNets
# ---------------------------------------------------------------------------------------------


def np_conv_transpose_torch(x, weight, bias, stride, pad):
  """PyTorch ConvTranspose2d semantics, NHWC in/out, weight [C_in, C_out, k, k]: every input pixel
  (h, w) adds in[h, w, i]·weight[i, o, a, b] to output (h·stride − pad + a, w·stride − pad + b)."""
  bsz, h, w, _ = x.shape
  k = weight.shape[-1]
  full = np.zeros((bsz, (h - 1) * stride + k, (w - 1) * stride + k, weight.shape[1]))
  for a in range(k):
    for b in range(k):
      full[:, a:a + stride * (h - 1) + 1:stride, b:b + stride * (w - 1) + 1:stride] += (
          x @ weight[:, :, a, b])
  out_h, out_w = (h - 1) * stride - 2 * pad + k, (w - 1) * stride - 2 * pad + k
  return full[:, pad:pad + out_h, pad:pad + out_w] + bias


@pytest.mark.parametrize("student_hw, teacher_hw, kind", [
    ((8, 8), (4, 4), "stride2"), ((4, 4), (8, 8), "transpose"), ((6, 6), (4, 4), "valid"),
    ((4, 4), (4, 4), "valid")])
def test_fitnet_regressor_matches_numpy(student_hw, teacher_hw, kind):
  """The regressor (eval-mode BN with random statistics, ReLU) against the reference ops:
  Conv2d(3×3, stride 2, padding 1) / ConvTranspose2d(4×4, stride 2, padding 1) / a valid Conv2d.
  The transposed case reads the kernel in PyTorch's layout [C_s, C_t, 4, 4], checking the mapping."""
  x = rng(10).normal(size=(2, *student_hw, 3)).astype(np.float32)
  regressor = fl.FitNetRegressor(target_shape=(*teacher_hw, 5))
  variables = randomise_bn(regressor.init(jax.random.key(3), jnp.asarray(x), train=False), 19)
  params = variables["params"]
  kernel, bias = np.asarray(params["conv"]["kernel"], np.float64), np.asarray(params["conv"]["bias"])
  x64 = x.astype(np.float64)
  if kind == "transpose":
    assert kernel.shape == (4, 4, 5, 3)  # Flax [4, 4, C_t, C_s] <-> PyTorch [C_s, C_t, 4, 4]
    y = np_conv_transpose_torch(x64, kernel.transpose(3, 2, 0, 1), bias, stride=2, pad=1)
  else:
    stride, pad = (2, 1) if kind == "stride2" else (1, 0)
    y = np_conv(x64, kernel, stride=stride, pad=pad) + bias
  to64 = lambda t: {k: np.asarray(v, np.float64) for k, v in t.items()}
  ref = np.maximum(np_bn_eval(y, to64(params["bn"]), to64(variables["batch_stats"]["bn"])), 0)
  got = regressor.apply(variables, jnp.asarray(x), train=False)
  assert got.shape == (2, *teacher_hw, 5)
  close(got, ref, atol=1e-5)


def test_fitnet_regressor_rejects_incompatible_sizes():
  with pytest.raises(ValueError, match="FitNetRegressor"):
    fl.FitNetRegressor(target_shape=(9, 9, 4)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)),
                                                    train=False)


def test_fitnet_hint_loss():
  r = rng(11)
  a, b = r.normal(size=(2, 3, 3, 4)), r.normal(size=(2, 3, 3, 4))
  close(fl.fitnet_hint_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)),
        np.sum((a - b) ** 2) / a.size)
  with pytest.raises(ValueError, match="teacher"):
    fl.fitnet_hint_loss(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 5)))


# ---------------------------------------------------------------------------------------------
# CRD
# ---------------------------------------------------------------------------------------------


def unit_rows(a):
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def np_nce(x, num_data, eps=1e-7):
  """-(1/B)·[Σ log(x0/(x0 + m/N + eps)) + Σ_k log((m/N)/(xk + m/N + eps))], m = K."""
  bsz, k1 = x.shape
  m_pn = (k1 - 1) / num_data
  total = 0.0
  for i in range(bsz):
    total += math.log(x[i, 0] / (x[i, 0] + m_pn + eps))
    for k in range(1, k1):
      total += math.log(m_pn / (x[i, k] + m_pn + eps))
  return -total / bsz


def crd_case(seed, num_data=20, dim=6, bsz=3, k=5):
  r = rng(seed)
  state = fl.CRDState(memory_student=jnp.asarray(unit_rows(r.normal(size=(num_data, dim))), jnp.float32),
                      memory_teacher=jnp.asarray(unit_rows(r.normal(size=(num_data, dim))), jnp.float32),
                      z_student=-jnp.ones(()), z_teacher=-jnp.ones(()))
  e_s = unit_rows(r.normal(size=(bsz, dim))).astype(np.float32)
  e_t = unit_rows(r.normal(size=(bsz, dim))).astype(np.float32)
  indices = r.choice(num_data, bsz, replace=False)
  contrast = np.concatenate([indices[:, None], r.integers(0, num_data, (bsz, k))], axis=1)
  return state, e_s, e_t, indices, contrast


def test_crd_nce_loss_matches_numpy():
  x = rng(12).uniform(0.01, 2.0, size=(4, 7))
  close(fl.crd_nce_loss(jnp.asarray(x, jnp.float32), 50), np_nce(x, 50))


def test_crd_scores_set_the_normalisers_once():
  state, e_s, e_t, _, contrast = crd_case(13)
  tau, n = 0.07, 20
  m_s, m_t = np.asarray(state.memory_student, np.float64), np.asarray(state.memory_teacher, np.float64)
  raw_s = np.array([[math.exp(m_t[j] @ e_s[b] / tau) for j in contrast[b]] for b in range(3)])
  raw_t = np.array([[math.exp(m_s[j] @ e_t[b] / tau) for j in contrast[b]] for b in range(3)])
  s, t, state1 = fl.crd_scores(jnp.asarray(e_s), jnp.asarray(e_t), state, jnp.asarray(contrast))
  z_s, z_t = raw_s.mean() * n, raw_t.mean() * n
  close(state1.z_student, z_s, rtol=2e-5)
  close(state1.z_teacher, z_t, rtol=2e-5)
  close(s, raw_s / z_s, rtol=2e-5)
  close(t, raw_t / z_t, rtol=2e-5)
  # A set normaliser is kept: scores on the next batch divide by the first batch's constant.
  _, other_e_s, other_e_t, _, _ = crd_case(14)
  s2, _, state2 = fl.crd_scores(jnp.asarray(other_e_s), jnp.asarray(other_e_t), state1,
                                jnp.asarray(contrast))
  raw_s2 = np.array([[math.exp(m_t[j] @ other_e_s[b] / tau) for j in contrast[b]] for b in range(3)])
  close(state2.z_student, z_s, rtol=2e-5)
  close(s2, raw_s2 / z_s, rtol=2e-5)


def test_crd_update_memory_matches_numpy():
  state, e_s, e_t, indices, _ = crd_case(15)
  new = fl.crd_update_memory(state, jnp.asarray(e_s), jnp.asarray(e_t), jnp.asarray(indices),
                             momentum=0.5)
  for memory, new_memory, e in ((state.memory_student, new.memory_student, e_s),
                                (state.memory_teacher, new.memory_teacher, e_t)):
    expected = np.array(memory, np.float64)
    for b, i in enumerate(indices):
      v = 0.5 * expected[i] + 0.5 * e[b]
      expected[i] = v / np.linalg.norm(v)
    close(new_memory, expected)
  assert float(new.z_student) == float(state.z_student)


def test_crd_loss_uses_the_old_memory_then_updates_it():
  state, e_s, e_t, indices, contrast = crd_case(16)
  loss, new = fl.crd_loss(jnp.asarray(e_s), jnp.asarray(e_t), state, jnp.asarray(indices),
                          jnp.asarray(contrast), temperature=0.1, momentum=0.3)
  s, t, with_z = fl.crd_scores(jnp.asarray(e_s), jnp.asarray(e_t), state, jnp.asarray(contrast),
                               temperature=0.1)
  close(loss, np_nce(np.asarray(s, np.float64), 20) + np_nce(np.asarray(t, np.float64), 20), rtol=2e-5)
  expected = fl.crd_update_memory(with_z, jnp.asarray(e_s), jnp.asarray(e_t), jnp.asarray(indices),
                                  momentum=0.3)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The state is a pytree (checkpointable) and the loss is differentiable in the embeddings only.
  g_s, g_state = jax.grad(lambda e, st: fl.crd_loss(e, jnp.asarray(e_t), st, jnp.asarray(indices),
                                                    jnp.asarray(contrast))[0], argnums=(0, 1))(
                                                        jnp.asarray(e_s), state)
  assert float(jnp.max(jnp.abs(g_s))) > 0
  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(g_state))


def test_crd_embed_and_init_state():
  x = rng(17).normal(size=(3, 2, 2, 4)).astype(np.float32)
  embed = fl.CRDEmbed(features=5)
  variables = embed.init(jax.random.key(4), jnp.asarray(x))
  linear = variables["params"]["linear"]
  k, b = np.asarray(linear["kernel"]), np.asarray(linear["bias"])
  assert k.shape == (16, 5) and np.all(np.abs(k) <= 0.25) and np.all(np.abs(b) <= 0.25)
  close(embed.apply(variables, jnp.asarray(x)), unit_rows(x.reshape(3, -1) @ k + b))
  state = fl.crd_init_state(jax.random.key(5), 100, 12)
  bound = 1 / math.sqrt(12 / 3)
  assert state.memory_student.shape == state.memory_teacher.shape == (100, 12)
  assert float(jnp.max(jnp.abs(state.memory_teacher))) <= bound
  assert float(state.z_student) < 0 and float(state.z_teacher) < 0


def test_crd_contrast_indices_draw_other_classes_uniformly():
  labels = np.array([0] * 3 + [1] * 6 + [2] * 11)  # unbalanced classes
  order = rng(18).permutation(len(labels))
  labels = labels[order]
  index = fl.crd_class_index(labels, 3)
  batch = np.array([0, 5, 9])
  draws = fl.crd_contrast_indices(jax.random.key(6), jnp.asarray(batch), jnp.asarray(labels[batch]),
                                  index, 20000)
  draws = np.asarray(draws)
  assert draws.shape == (3, 20001)
  np.testing.assert_array_equal(draws[:, 0], batch)
  for b, i in enumerate(batch):
    others = np.flatnonzero(labels != labels[i])
    counts = np.bincount(draws[b, 1:], minlength=len(labels))
    assert set(np.flatnonzero(counts)) == set(others)  # every other-class example, nothing else
    expected = 20000 / len(others)
    assert np.all(np.abs(counts[others] - expected) < 5 * math.sqrt(expected))


def test_crd_class_index_errors():
  with pytest.raises(ValueError, match="single class"):
    fl.crd_class_index(np.zeros(5, int), 3)
  with pytest.raises(ValueError, match="labels"):
    fl.crd_class_index(np.array([0, 3]), 3)
