"""Three train steps of tiny GPD and KD runs through the public step API, for the regression test.

``tests/data/step_reference.npz`` holds the output of ``run_reference`` produced by the single-network
step as it was before the step learned to train several networks (main at the merge of h8/h11/h12/h13,
before h10's core change), with:

    python tests/step_reference.py        # (re)writes tests/data/step_reference.npz

``test_online_step.py`` runs the same function on the current code and compares every leaf of the
state and every metric. Regenerate only on purpose (a deliberate change of the GPD step's numbers).
"""
import os
import sys

if __name__ == "__main__":  # the tests' setting (conftest.py): 8 fake CPU devices
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpd_jax import config_base, models, optim  # noqa: E402
from gpd_jax.state import build_task, init_state  # noqa: E402
from gpd_jax.step import make_train_step  # noqa: E402

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "step_reference.npz")
TINY = {"widths": (4, 4, 8, 8)}
NUM_CLASSES, SHAPE, STEPS = 5, (1, 16, 16, 3), 3


def reference_config(gpd: bool):
  c = config_base.base_config()
  c.model.name = "resnet8"
  c.model.kwargs = dict(TINY)
  c.teacher.name = "resnet8"
  c.loss.base = "dkd" if gpd else "kd"
  c.schedule.name = "constant"
  c.schedule.base_lr = 0.05
  c.optim.clip_norm = 5.0
  c.ema_decay = 0.9
  if gpd:
    config_base.gpd_on(c, ratio=2, branches=True)
  return c


def run_reference(gpd: bool) -> dict:
  """Flat ``{name: array}``: the metrics of each step and every leaf of the final state."""
  c = reference_config(gpd)
  teacher = models.create("resnet8", NUM_CLASSES, **TINY)
  teacher_variables = teacher.init(jax.random.key(1), jnp.zeros(SHAPE), train=False)
  task = build_task(c, num_classes=NUM_CLASSES, sample_shape=SHAPE, teacher=teacher,
                    steps_per_epoch=10)
  schedule = optim.make_schedule(c.schedule, steps_per_epoch=10, total_steps=STEPS)
  tx = optim.make_optimizer(c.optim, schedule)
  state = jax.jit(lambda r: init_state(task, c, tx, r))(jax.random.key(3, impl="rbg"))
  step = jax.jit(make_train_step(task, tx, schedule, c.ema_decay))
  rng = np.random.default_rng(0)
  out = {}
  for i in range(STEPS):
    batch = {"image": jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, NUM_CLASSES, size=8), jnp.int32)}
    state, metrics = step(state, batch, teacher_variables)
    for k, v in metrics.items():
      out[f"step{i}/metric/{k}"] = np.asarray(v)
  fields = {"params": state.params, "batch_stats": state.batch_stats,
            "student_batch_stats": state.student_batch_stats, "opt_state": state.opt_state,
            "ema": state.ema, "step": state.step}
  for path, leaf in jax.tree_util.tree_leaves_with_path(fields):
    out["state/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


if __name__ == "__main__":
  os.makedirs(os.path.dirname(PATH), exist_ok=True)
  arrays = {}
  for gpd in (True, False):
    arrays.update({f"{'gpd' if gpd else 'kd'}/{k}": v for k, v in run_reference(gpd).items()})
  np.savez_compressed(PATH, **arrays)
  print(f"wrote {len(arrays)} arrays, {os.path.getsize(PATH)} bytes to {PATH}")
