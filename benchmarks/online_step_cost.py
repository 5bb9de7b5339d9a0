"""Cost of one step that trains two networks against the two single-network steps it replaces.

    python benchmarks/online_step_cost.py --out=benchmarks/results/cpu_online_step_cost.json

For each pair (DML: ResNet-8 + ResNet-8; BD-KD: ResNet-8 student + ResNet-20 online teacher; DML
between two GPD ResNet-8 students) it times the real jitted train step
(``gpd_jax.step.make_train_step``) of the joint run and of each network trained alone with CE,
round-robin over ``--rounds`` rounds of ``--steps`` steps on one fixed batch, and reports
``joint / (alone_a + alone_b)`` (the issue's budget: at most 1).
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpd_jax import config_base, optim
from gpd_jax.state import build_task, init_state
from gpd_jax.step import make_train_step

PAIRS = {
    "dml": (("resnet8", 0), ("resnet8", 0), ("ce(peer)", "dml(student<->peer)")),
    "bdkd": (("resnet8", 0), ("resnet20", 0),
             ("ce(peer)", "bdkd(student<-peer)", "reverse_kl(peer<-student)")),
    "dml_gpd": (("resnet8", 2), ("resnet8", 2),
                ("ce(peer)", "ce(peer_dt)", "3*sce(peer<-peer_dt)", "dml(student<->peer)")),
}


def config_for(model, gpd_ratio, peer=None, terms=()):
  c = config_base.base_config()
  c.model.name = model
  c.loss.base = "ce"
  c.schedule.name = "constant"
  c.optim.clip_norm = 5.0
  if gpd_ratio:
    config_base.gpd_on(c, ratio=gpd_ratio, branches=False)
  if peer is not None:
    c.online.peers.peer = config_base.online_peer(peer[0], gpd_ratio=peer[1])
    c.online.terms = terms
  return c


def compile_step(c, args, batch):
  shape = (1, args.image_size, args.image_size, args.channels)
  task = build_task(c, num_classes=args.num_classes, sample_shape=shape, steps_per_epoch=100)
  schedule = optim.make_schedule(c.schedule, steps_per_epoch=100, total_steps=1000)
  tx = optim.make_optimizer(c.optim, schedule)
  holder = {"state": jax.jit(lambda r: init_state(task, c, tx, r))(jax.random.key(0, impl="rbg"))}
  step = jax.jit(make_train_step(task, tx, schedule, c.ema_decay), donate_argnums=(0,))
  holder["state"], _ = step(holder["state"], batch, None)
  jax.block_until_ready(holder["state"])

  def run(n):
    start = time.perf_counter()
    for _ in range(n):
      holder["state"], metrics = step(holder["state"], batch, None)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n

  return run


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--pairs", default=",".join(PAIRS))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--image_size", type=int, default=28)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size,
                                                 args.channels)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, args.num_classes, size=args.batch), jnp.int32)}
  results = {"device": jax.devices()[0].device_kind, "platform": platform.platform(),
             "batch": args.batch, "image": [args.image_size, args.image_size, args.channels],
             "pairs": {}}
  for name in args.pairs.split(","):
    (model_a, ratio_a), (model_b, ratio_b), terms = PAIRS[name]
    runs = {"joint": compile_step(config_for(model_a, ratio_a, (model_b, ratio_b), terms), args, batch),
            "alone_a": compile_step(config_for(model_a, ratio_a), args, batch),
            "alone_b": compile_step(config_for(model_b, ratio_b), args, batch)}
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
      for k, run in runs.items():
        times[k].append(run(args.steps))
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    ratio = ms["joint"] / (ms["alone_a"] + ms["alone_b"])
    results["pairs"][name] = {"ms_per_step": ms, "joint_over_sum": ratio,
                              "networks": [f"{model_a} r{ratio_a}", f"{model_b} r{ratio_b}"]}
    print(f"{name}: joint {ms['joint']:.1f} ms, alone {ms['alone_a']:.1f} + {ms['alone_b']:.1f} ms; "
          f"joint / sum = {ratio:.3f}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
