"""The multi-network step: the GPD/KD step unchanged, per-network gradients, SwitOKD's pause and its
resume, several frozen teachers, 8-device sharding, and each online method end to end (tiny models)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_reference  # noqa: E402
from test_train import make_teacher, tiny_config, train_losses, TINY  # noqa: E402

from gpd_jax import checkpoint, config_base, online_losses, optim, train  # noqa: E402
from gpd_jax.metric_writer import read_metrics  # noqa: E402
from gpd_jax.state import build_task, init_state  # noqa: E402
from gpd_jax.step import forward_network, make_train_step  # noqa: E402


@pytest.mark.parametrize("method", ["gpd", "kd"])
def test_single_network_step_matches_the_stored_reference(method):
  """Three steps of the GPD (DKD + GPD, OREPA branches, EMA, clipping) and KD steps reproduce the
  numbers the pre-generalisation step produced (tests/data/step_reference.npz) bit for bit."""
  stored = np.load(step_reference.PATH)
  want = {k[len(method) + 1:]: stored[k] for k in stored.files if k.startswith(method + "/")}
  got = step_reference.run_reference(method == "gpd")
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def online_config(method="dml", *, steps=2, devices=1):
  """tiny_config with a tiny peer (or two), the run's student trained with CE."""
  c = tiny_config(gpd=False, teacher=False, steps=steps, devices=devices)
  peer = lambda: config_base.online_peer("resnet8", kwargs=TINY)
  if method == "dml":
    c.online.peers.peer = peer()
    c.online.terms = ("ce(peer)", "dml(student<->peer)")
  elif method == "dml3":
    c.online.peers.peer = peer()
    c.online.peers.peer2 = peer()
    c.online.terms = ("ce(peer)", "ce(peer2)", "dml(student<-peer,peer2)",
                      "dml(peer<-student,peer2)", "dml(peer2<-student,peer)")
  elif method == "dml_gpd":
    config_base.gpd_on(c, ratio=2, branches=False)
    c.online.peers.peer = config_base.online_peer("resnet8", kwargs=TINY, gpd_ratio=2)
    c.online.terms = ("ce(peer)", "ce(peer_dt)", "3*sce(peer<-peer_dt)", "dml(student<->peer)")
  elif method in ("switokd", "bdkd"):
    c.online.peers.online_teacher = peer()
    c.online.terms = (("ce(online_teacher)", "dml(student<->online_teacher)") if method == "switokd"
                      else ("ce(online_teacher)", "bdkd(student<-online_teacher)",
                            "reverse_kl(online_teacher<-student)"))
    if method == "switokd":
      c.online.switch.teacher = "online_teacher"
  elif method == "sokd":
    c.teacher.name = "resnet8"
    c.teacher.workdir = "teacher"
    c.loss.base = "kd"
    c.online.peers.bridge = config_base.online_peer("resnet8", kwargs=TINY, init="teacher")
    c.online.terms = ("ce(bridge)", "kd(bridge<-teacher)", "dml(student<->bridge)")
  elif method == "camkd":
    c.teacher.name = "resnet8"
    c.teacher.workdir = "teacher"
    c.online.teachers.teacher_2 = config_base.frozen_teacher("resnet8", "teacher_2")
    c.online.terms = ("camkd(student<-teacher,teacher_2)",)
  else:
    raise ValueError(method)
  return c


def _plain_sgd(c):
  c.optim.momentum = 0.0
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 0.0
  c.ema_decay = 0.0
  return c


def test_two_networks_get_exactly_the_gradients_of_their_own_terms():
  """One DML step with plain SGD: each network moves by -lr times the gradient of its own terms,
  computed here separately with the other network's logits held fixed."""
  c = _plain_sgd(online_config("dml"))
  shape, k = (1, 16, 16, 3), 5
  task = build_task(c, num_classes=k, sample_shape=shape, steps_per_epoch=4)
  schedule = optim.make_schedule(c.schedule, steps_per_epoch=4, total_steps=2)
  tx = optim.make_optimizer(c.optim, schedule)
  state = init_state(task, c, tx, jax.random.key(0, impl="rbg"))
  rng = np.random.default_rng(1)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, k, size=8), jnp.int32)}
  new_state, metrics = jax.jit(make_train_step(task, tx, schedule, 0.0))(state, batch, None)

  main, peer = task.networks
  def logits_of(net, params):
    s = state.network(net.name)
    out, _ = forward_network(net, params, s.consts, s.batch_stats, s.student_batch_stats,
                             batch["image"], train=True, rngs={"dropout": jax.random.key(0)})
    return out[net.name]
  def ce(z):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), batch["label"][:, None], 1))
  def kl_to(z, target):  # KL(softmax(target) || softmax(z)), the target fixed
    q = jax.nn.softmax(target)
    return jnp.mean(jnp.sum(q * (jnp.log(q) - jax.nn.log_softmax(z)), -1))
  z_main = logits_of(main, state.params)
  z_peer = logits_of(peer, state.peers["peer"].params)
  g_main = jax.grad(lambda p: ce(logits_of(main, p)) + kl_to(logits_of(main, p), z_peer))(state.params)
  g_peer = jax.grad(lambda p: ce(logits_of(peer, p)) + kl_to(logits_of(peer, p), z_main))(
      state.peers["peer"].params)
  lr = float(schedule(0))
  for old, new, g in ((state.params, new_state.params, g_main),
                      (state.peers["peer"].params, new_state.peers["peer"].params, g_peer)):
    jax.tree.map(lambda o, n, gg: np.testing.assert_allclose((o - n) / lr, gg, rtol=2e-4, atol=1e-6),
                 old, new, g)
  np.testing.assert_allclose(metrics["grad_norm_peer"], np.sqrt(sum(
      np.sum(np.square(x)) for x in jax.tree.leaves(g_peer))), rtol=1e-4)
  np.testing.assert_allclose(metrics["total"], ce(z_main) + kl_to(z_main, z_peer) + ce(z_peer)
                             + kl_to(z_peer, z_main), rtol=1e-5)


@pytest.mark.parametrize("expert", [True, False])
def test_switokd_expert_mode_pauses_the_teacher(monkeypatch, expert):
  """Whatever the statistics say, expert mode keeps the teacher's whole state; learning mode moves
  it. The student moves in both. The switch state counts the expert steps."""
  real = online_losses.switch_statistics
  monkeypatch.setattr(online_losses, "switch_statistics",
                      lambda *a: {**real(*a), "expert": jnp.asarray(expert)})
  c = online_config("switokd")
  task = build_task(c, num_classes=5, sample_shape=(1, 16, 16, 3), steps_per_epoch=4)
  schedule = optim.make_schedule(c.schedule, steps_per_epoch=4, total_steps=2)
  tx = optim.make_optimizer(c.optim, schedule)
  state = init_state(task, c, tx, jax.random.key(0, impl="rbg"))
  rng = np.random.default_rng(2)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, size=8), jnp.int32)}
  step = make_train_step(task, tx, schedule, c.ema_decay)
  new_state, metrics = step(state, batch, None)
  old_t, new_t = state.peers["online_teacher"], new_state.peers["online_teacher"]
  same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), old_t, new_t))
  assert all(same) if expert else not all(same)
  assert not np.array_equal(jax.tree.leaves(state.params)[0], jax.tree.leaves(new_state.params)[0])
  assert int(new_state.switch["expert_steps"]) == int(expert)
  assert float(metrics["switch_expert"]) == float(expert)


def test_switokd_resume_reproduces_the_uninterrupted_run(tmp_path):
  """Kill after step 2 of 6, resume: same losses, same switch counter and mode as one straight run.
  The online teacher starts from a network trained briefly on the data, so that it pauses (expert
  mode) at least once."""
  pre = str(tmp_path / "pre")
  c = tiny_config(gpd=False, teacher=False, steps=24)
  c.schedule.base_lr = 0.1
  train.train_and_evaluate(c, pre)
  def config(steps):
    c = online_config("switokd", steps=steps)
    c.online.peers.online_teacher.init = pre
    return c
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config(6), straight)
  train.train_and_evaluate(config(2), resumed)
  train.train_and_evaluate(config(6), resumed)
  a, b = train_losses(straight), train_losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)
  expert = {w: [r["switch_expert"] for r in read_metrics(w, "train")] for w in (straight, resumed)}
  assert expert[straight] == expert[resumed]
  assert sum(expert[straight]) >= 1
  states = []
  for w in (straight, resumed):
    run = train.setup(config(6), w, training=False)
    states.append(jax.device_get(run.state.switch))
    run.ckpt.close()
  assert int(states[0]["expert_steps"]) == int(states[1]["expert_steps"]) == int(sum(expert[straight]))
  assert bool(states[0]["expert"]) == bool(states[1]["expert"]) == bool(expert[straight][-1])


def test_dml_on_one_and_eight_devices_gives_the_same_loss(tmp_path):
  losses = {}
  for devices in (1, 8):
    w = str(tmp_path / f"d{devices}")
    train.train_and_evaluate(online_config("dml", devices=devices), w)
    losses[devices] = train_losses(w)
  np.testing.assert_allclose([losses[8][s] for s in (1, 2)], [losses[1][s] for s in (1, 2)], rtol=2e-5)


@pytest.mark.parametrize("method", ["dml", "dml3", "dml_gpd", "sokd", "bdkd", "camkd"])
def test_online_methods_run_end_to_end(tmp_path, method):
  workdir = str(tmp_path)
  if method in ("sokd", "camkd"):
    make_teacher(workdir)
  if method == "camkd":
    make_teacher(str(tmp_path / "t2"), seed=7)
    os.rename(tmp_path / "t2" / "teacher", tmp_path / "teacher_2")
  final = train.train_and_evaluate(online_config(method), workdir)
  last = read_metrics(workdir, "train")[-1]
  assert np.isfinite(last["total"])
  val = final["eval"]["val"]
  peers = {"dml": ["peer"], "dml3": ["peer", "peer2"], "dml_gpd": ["peer"], "sokd": ["bridge"],
           "bdkd": ["online_teacher"], "camkd": []}[method]
  for name in peers:
    assert 0.0 <= val[f"top1_P_{name}"] <= 100.0
    assert f"grad_norm_{name}" in last
    assert os.path.isfile(os.path.join(workdir, f"export_{name}", "model.json"))
  if method == "dml_gpd":
    assert "top1_P_peer_dt" in val and "sce_peer_from_peer_dt" in last and "sce_S" in last
  if method == "camkd":
    assert last["camkd_student_from_teacher_teacher_2"] > 0
  if method == "sokd":  # the bridge starts as the teacher: same logits at step 0 on the same batch
    _, teacher_vars, _ = checkpoint.load_export(os.path.join(workdir, "teacher"))
    _, bridge_vars, _ = checkpoint.load_export(os.path.join(workdir, "export_bridge"))
    assert jax.tree.structure(teacher_vars) == jax.tree.structure(bridge_vars)
    # Two small SGD steps away from the teacher's weights (a random start would be ~1.4× their norm).
    t, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(v["params"])])
            for v in (teacher_vars, bridge_vars))
    assert np.linalg.norm(b - t) < 0.3 * np.linalg.norm(t)


def test_teacher_assistant_chain_runs_as_consecutive_resumable_runs(tmp_path):
  """TAKD (and born-again, the same mechanism): the student's teacher is an assistant whose own
  teacher is trained first; each link is an ordinary workdir. Rerunning the chain trains nothing."""
  header = "import sys\nsys.path.insert(0, %r)\nfrom test_train import tiny_config\n" % os.path.dirname(__file__)
  teacher_config, assistant_config = tmp_path / "teacher_config.py", tmp_path / "assistant_config.py"
  teacher_config.write_text(header + "def get_config(arg=None):\n"
                            "  return tiny_config(gpd=False, teacher=False, steps=2)\n")
  assistant_config.write_text(header + "def get_config(arg=None):\n"
                              "  c = tiny_config(gpd=False, base='kd', steps=2)\n"
                              f"  c.teacher.config = {str(teacher_config)!r}\n  return c\n")
  c = tiny_config(gpd=False, base="kd", steps=2)
  c.teacher.workdir = "assistant"
  c.teacher.config = str(assistant_config)
  workdir = str(tmp_path / "student")
  train.train_and_evaluate(c, workdir)
  for link in ("student/assistant/teacher", "student/assistant", "student"):
    assert os.path.isfile(tmp_path / link / "export" / "model.json"), link
  assert sorted(train_losses(os.path.join(workdir, "assistant"))) == [1, 2]
  mtimes = {p: os.path.getmtime(p) for p in (os.path.join(workdir, "export", "model.json"),
                                              os.path.join(workdir, "assistant", "export", "model.json"))}
  final = train.train_and_evaluate(c, workdir)
  assert final.get("already_finished")
  assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
