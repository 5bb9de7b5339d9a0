"""Feature distillation in the trainer (gpd_jax/feature_kd.py): where each term's gradient goes, the
connectors and CRD's memory bank in the state (resume, export), the features-off step, the configs.

Tiny CIFAR ResNets on 16×16 synthetic images, as tests/test_train.py.
"""
import os
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import TINY, make_teacher, tiny_config, train_losses  # noqa: E402

from gpd_jax import checkpoint, config_base, models, optim, train  # noqa: E402
from gpd_jax.metric_writer import read_metrics  # noqa: E402
from gpd_jax.state import build_task, init_state  # noqa: E402
from gpd_jax.step import forward_network, frozen_outputs  # noqa: E402
from gpd_jax.transforms import student_view  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (1, 16, 16, 3)


def feature_config(method, *, gpd=True, steps=2, devices=1):
  """tiny_config with CE as the logit loss and ``method`` as the feature term."""
  c = tiny_config(gpd=gpd, steps=steps, devices=devices, base="ce")
  c.features.method = method
  c.features.weight = {"reviewkd": 1.0, "sp": 3000.0, "fitnet": 100.0, "crd": 0.8}[method]
  c.features.fitnet.hint_layer = 2
  c.features.crd.num_negatives = 16
  c.features.crd.feature_dim = 8
  return c


# ---------------------------------------------------------------------------------------------
# Gradient paths


def _grads_of_feature_term(target):
  """Gradients of the ReviewKD + GPD term of ``target`` ('student' or 'dt') alone, w.r.t. θ, both
  connectors and the teacher's params, on one random batch; plus the mask of θ the view reads."""
  c = feature_config("reviewkd")
  c.gpd.student_uses_static_kd = target == "student"
  c.gpd.dt_uses_static_kd = target == "dt"
  teacher = models.create("resnet8", 5, **TINY)
  teacher_variables = teacher.init(jax.random.key(1), jnp.zeros(SHAPE), train=False)
  # The task with both connectors (the state); the term's own task for the objective.
  full = build_task(feature_config("reviewkd"), num_classes=5, sample_shape=SHAPE, teacher=teacher)
  task = build_task(c, num_classes=5, sample_shape=SHAPE, teacher=teacher)
  assert task.feature_objective.targets == (target,)
  tx = optim.make_optimizer(c.optim, optim.make_schedule(c.schedule, steps_per_epoch=1, total_steps=1))
  state = jax.jit(lambda r: init_state(full, c, tx, r))(jax.random.key(3, impl="rbg"))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, size=8), jnp.int32)
  net = task.networks[0]

  def term(theta, connector_params, teacher_params):
    _, teacher_features = frozen_outputs(task, {**teacher_variables, "params": teacher_params},
                                         images, train=True, with_features=True)
    _, _, features = forward_network(net, theta, state.consts, state.batch_stats,
                                     state.student_batch_stats, images, train=True,
                                     with_features=True)
    connectors = {"params": {target: connector_params[target]},
                  "batch_stats": {target: state.connectors["batch_stats"][target]}}
    total, _, _, _ = task.feature_objective({**features, **teacher_features}, labels, step=0,
                                            connectors=connectors, feature_state=None,
                                            batch={"image": images, "label": labels})
    return total

  grads = jax.jit(jax.grad(term, argnums=(0, 1, 2)))(
      state.params, state.connectors["params"], teacher_variables["params"])

  def view_params(theta):
    _, view = student_view(net.model, {"params": theta, "consts": state.consts}, spec=net.view_spec)
    return view["params"]

  # θ entries the student view reads: where the transpose of the view sends a cotangent of ones.
  _, vjp = jax.vjp(view_params, state.params)
  (read,) = vjp(jax.tree.map(jnp.ones_like, view_params(state.params)))
  return grads, read


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_student_feature_term_reaches_the_student_slice_and_its_connector_only():
  (g_theta, g_connectors, g_teacher), read = _grads_of_feature_term("student")
  outside = [np.abs(g * (r == 0)).max() for g, r in zip(_leaves(g_theta), _leaves(read))]
  assert max(outside) == 0.0  # nothing outside the student's slice of θ
  assert max(np.abs(g).max() for g in _leaves(g_theta)) > 0  # but the slice gets a gradient
  assert max(np.abs(g).max() for g in _leaves(g_connectors["student"])) > 0
  assert all(np.all(g == 0) for g in _leaves(g_connectors["dt"]))
  assert all(np.all(g == 0) for g in _leaves(g_teacher))


def test_dt_feature_term_reaches_all_of_theta_and_its_connector_only():
  (g_theta, g_connectors, g_teacher), read = _grads_of_feature_term("dt")
  outside = [np.abs(g * (r == 0)).max() for g, r in zip(_leaves(g_theta), _leaves(read))]
  assert max(outside) > 0  # the DT's term trains the DT beyond the student's slice
  assert max(np.abs(g).max() for g in _leaves(g_connectors["dt"])) > 0
  assert all(np.all(g == 0) for g in _leaves(g_connectors["student"]))
  assert all(np.all(g == 0) for g in _leaves(g_teacher))


def test_reviewkd_gpd_connectors_are_two_independent_stacks():
  """Student and DT stacks: same module, DT in-widths ×2, different random draws (never IR)."""
  teacher = models.create("resnet8", 5, **TINY)
  c = feature_config("reviewkd")
  task = build_task(c, num_classes=5, sample_shape=SHAPE, teacher=teacher)
  tx = optim.make_optimizer(c.optim, optim.make_schedule(c.schedule, steps_per_epoch=1, total_steps=1))
  state = jax.jit(lambda r: init_state(task, c, tx, r))(jax.random.key(3, impl="rbg"))
  s, d = state.connectors["params"]["student"], state.connectors["params"]["dt"]
  assert jax.tree.structure(s) == jax.tree.structure(d)
  assert d["abf0"]["conv1"]["kernel"].shape[2] == 2 * s["abf0"]["conv1"]["kernel"].shape[2]
  assert d["abf0"]["conv2"]["kernel"].shape == s["abf0"]["conv2"]["kernel"].shape
  assert not np.allclose(d["abf0"]["conv2"]["kernel"], s["abf0"]["conv2"]["kernel"])
  # One optimizer state over θ and the connectors; the EMA holds the connectors too.
  assert set(state.opt_state[-1][0].trace) == {"model", "connectors"}
  assert set(state.ema["connectors"]) == {"params", "batch_stats"}


# ---------------------------------------------------------------------------------------------
# Training, resume, export


def _state_leaves(workdir, config):
  run = train.setup(config, workdir, training=False)
  state = jax.device_get(run.state)
  run.ckpt.close()
  return state


@pytest.mark.parametrize("method", ["reviewkd", "crd"])
def test_connectors_and_crd_bank_resume_bitwise_and_are_not_exported(tmp_path, method):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  for w in (straight, resumed):
    make_teacher(w)
  train.train_and_evaluate(feature_config(method, steps=4), straight)
  train.train_and_evaluate(feature_config(method, steps=2), resumed)  # "interrupted" after step 2
  train.train_and_evaluate(feature_config(method, steps=4), resumed)
  a, b = (_state_leaves(w, feature_config(method, steps=4)) for w in (straight, resumed))
  assert a.connectors is not None and b.connectors is not None
  paths_a = jax.tree_util.tree_leaves_with_path(a)
  paths_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
  for (path, x), (_, y) in zip(paths_a, paths_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  if method == "crd":
    # The memory bank moved: the examples of 4 steps (32 of 32) were written.
    bank = a.feature_state["student"]
    assert bank.memory_student.shape == (32, 8) and float(bank.z_student) > 0
    np.testing.assert_allclose(np.linalg.norm(bank.memory_student, axis=1), 1.0, rtol=1e-5)
  last = read_metrics(straight, "train")[-1]
  assert f"{method}_S" in last and f"{method}_D" in last and last["grad_norm_connectors"] > 0
  # The exports are the plain student, without a connector leaf.
  plain = models.create("resnet8", 5, **TINY).init(jax.random.key(0), jnp.zeros(SHAPE), train=False)
  for name in ("export", "export_ema"):
    _, variables, _ = checkpoint.load_export(os.path.join(straight, name))
    assert jax.tree.structure(variables) == jax.tree.structure(jax.device_get(plain)), name


@pytest.mark.parametrize("method", ["reviewkd", "crd"])
def test_feature_runs_on_one_and_eight_devices_give_the_same_loss(tmp_path, method):
  losses, banks = {}, {}
  for devices in (1, 8):
    w = str(tmp_path / f"d{devices}")
    make_teacher(w)
    train.train_and_evaluate(feature_config(method, devices=devices), w)
    losses[devices] = train_losses(w)
    if method == "crd":
      run = train.setup(feature_config(method, devices=devices), w, training=False)
      run.ckpt.close()
      banks[devices] = run.state.feature_state["student"].memory_teacher
  np.testing.assert_allclose([losses[8][s] for s in (1, 2)], [losses[1][s] for s in (1, 2)],
                             rtol=2e-5)
  if method == "crd":
    # On 8 devices each holds 1/8 of the bank's embedding columns ([32, 8] -> [32, 1] a device).
    assert banks[8].sharding.spec == P(None, ("data",))
    assert {shard.data.shape for shard in banks[8].addressable_shards} == {(32, 1)}
    assert {shard.data.shape for shard in banks[1].addressable_shards} == {(32, 8)}
    np.testing.assert_allclose(np.asarray(banks[8]), np.asarray(banks[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["reviewkd", "reviewkd_gpd", "sp", "fitnet", "crd"])
def test_each_fashion_config_trains_from_the_cli(tmp_path, method):
  """launch/train.py with configs/fashion_mnist_features.py:<method>,runlocal, shrunk to tiny
  synthetic data and a tiny random teacher by a wrapper config file."""
  make_teacher(str(tmp_path))
  wrapper = tmp_path / "wrapper.py"
  wrapper.write_text(f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
from test_train import tiny_config
from gpd_jax.train import load_config_file

def get_config(arg=None):
  c = load_config_file({os.path.join(ROOT, 'configs', 'fashion_mnist_features.py')!r} + ':{method},runlocal')
  tiny = tiny_config(gpd=c.gpd.enabled, branches=c.gpd.branches, base='ce')
  for key in ('dataset', 'model', 'teacher', 'mesh'):
    c[key] = tiny[key]
  c.num_train_steps, c.batch_size, c.eval_batch_size, c.log_every_steps = 2, 8, 8, 1
  c.features.crd.num_negatives = 16
  return c
""")
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  try:
    import train as launcher  # launch/train.py
  finally:
    sys.path.pop(0)
  rc = launcher.main(["train.py", f"--config={wrapper}", f"--workdir={tmp_path}"])
  assert rc in (0, None)
  last = read_metrics(str(tmp_path), "train")[-1]
  suffixes = ("S", "D") if method == "reviewkd_gpd" else ("S",)
  name = "reviewkd" if method.startswith("reviewkd") else method
  for suffix in suffixes:
    assert np.isfinite(last[f"{name}_{suffix}"]) and last[f"{name}_{suffix}"] > 0
  assert os.path.isfile(os.path.join(str(tmp_path), "export", "model.json"))


# ---------------------------------------------------------------------------------------------
# Configs and bad input


def test_feature_method_without_teacher_is_refused(tmp_path):
  c = feature_config("sp", gpd=False)
  c.teacher.name = c.teacher.workdir = ""
  with pytest.raises(Exception, match=r"config\.features\.method='sp'.*teacher"):
    train.train_and_evaluate(c, str(tmp_path))


def test_bad_feature_fields_name_the_field():
  teacher = models.create("resnet8", 5, **TINY)
  c = feature_config("fitnet", gpd=False)
  c.features.fitnet.hint_layer = 7
  with pytest.raises(ValueError, match=r"config\.features\.fitnet\.hint_layer=7"):
    build_task(c, num_classes=5, sample_shape=SHAPE, teacher=teacher)
  c = feature_config("crd", gpd=False)
  with pytest.raises(ValueError, match=r"config\.features\.method='crd' needs the training labels"):
    build_task(c, num_classes=5, sample_shape=SHAPE, teacher=teacher)
  c = feature_config("reviewkd", gpd=False)
  vit = models.create("vit_fashion", 5)  # a model without feature taps
  with pytest.raises(ValueError, match=r"config\.features: the model .* has no feature taps"):
    build_task(c, num_classes=5, sample_shape=(1, 28, 28, 1), teacher=vit)
