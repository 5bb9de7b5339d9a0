"""OREPA branch cost: merging every branch into the 3×3 kernel vs running the factored ones.

Prints three things:

1. The cost model (``gpd_jax.models.layers.orepa_path_plan``) for every OREPA conv of a ResNet-18
   dynamic teacher (r = 2 by default) at the given batches: forward MACs of folding branches 3
   (1×1 → 3×3) and 5 (depthwise → pointwise) into the kernel vs running them on the activations,
   and the 'auto' choice.
2. The whole-network forward MACs of a GPD step's networks (DT and student view) without branches,
   with branches merged every step (the reference behaviour) and with 'auto'. A training step costs
   about 3× its forward on either path, so the ratios carry over.
3. Measured CPU time of a jitted forward+backward: one OrepaConv layer ('merge' vs 'auto', and a
   plain 3×3 conv for scale), and a small GPD-style step (DT forward + student view forward, one
   gradient w.r.t. the DT params) of a CIFAR model without branches / 'merge' / 'auto'.

Run: ``python benchmarks/orepa_branch_cost.py`` (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import time

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpd_jax import models
from gpd_jax.models.layers import (OREPA_RUN_COST_FACTOR, OrepaConv, orepa_branch_path,
                                   orepa_path_plan)
from gpd_jax.transforms import student_view

G = 1e9


def resnet18_convs(ratio: int, image_size: int):
  """(name, C_in, C_out, k, H_out·W_out, is_orepa) for every conv of a torchvision ResNet-18."""
  s = image_size // 4  # after the 7×7/2 stem and the 3×3/2 max pool
  convs = [("stem", 3, 64 * ratio, 7, (image_size // 2) ** 2, False)]
  c_prev = 64 * ratio
  for stage, base in enumerate((64, 128, 256, 512)):
    c = base * ratio
    hw = (s >> stage) ** 2
    for block in range(2):
      down = stage > 0 and block == 0
      convs.append((f"layer{stage + 1}.{block}.conv1", c_prev, c, 3, hw, not down))
      convs.append((f"layer{stage + 1}.{block}.conv2", c, c, 3, hw, True))
      if down:
        convs.append((f"layer{stage + 1}.{block}.shortcut", c_prev, c, 1, hw, False))
      c_prev = c
  return convs


def network_macs(ratio: int, image_size: int, batch: int):
  """Forward MACs of all convs: (no branches, branches merged every step, branches 'auto')."""
  plain = merge = auto = 0
  for _, c_in, c_out, k, hw, orepa in resnet18_convs(ratio, image_size):
    conv = batch * hw * k * k * c_in * c_out
    plain += conv
    if orepa:
      h = w = int(round(hw ** 0.5))
      plan = orepa_path_plan(c_out, c_in, False, batch, h, w)
      merge += plan.macs(run=())
      auto += plan.macs()
    else:
      merge += conv
      auto += conv
  return plain, merge, auto


def print_cost_table(ratio: int, image_size: int, batches):
  print(f"== 1. Cost model, ResNet-18 DT (r={ratio}) OREPA convs, {image_size}x{image_size} images, "
        "forward GMAC per conv")
  print(f"auto runs a branch iff {OREPA_RUN_COST_FACTOR} x run < merge (OREPA_RUN_COST_FACTOR)")
  print(f"{'stage':<7}{'convs':>6}{'C':>6}{'HxW':>7}{'B':>4} | {'b3 merge':>9}{'b3 run':>9} | "
        f"{'b5 merge':>9}{'b5 run':>9} | {'auto runs':>9} | {'conv':>7}{'fwd merge':>10}{'fwd auto':>9}")
  for batch in batches:
    s = image_size // 4
    for stage, base in enumerate((64, 128, 256, 512)):
      c, h = base * ratio, s >> stage
      n_convs = 4 if stage == 0 else 3
      p = orepa_path_plan(c, c, False, batch, h, h)
      run = ",".join(f"b{b}" for b in p.run) or "-"
      print(f"layer{stage + 1:<2}{n_convs:>6}{c:>6}{f'{h}x{h}':>7}{batch:>4} | "
            f"{p.merge_macs[3] / G:>9.3f}{p.run_macs[3] / G:>9.3f} | "
            f"{p.merge_macs[5] / G:>9.3f}{p.run_macs[5] / G:>9.3f} | {run:>9} | "
            f"{p.conv_macs / G:>7.3f}{p.macs(run=()) / G:>10.3f}{p.macs() / G:>9.3f}")
  print()
  print(f"== 2. Whole-network forward GMAC of a GPD step's networks (ResNet-18, {image_size}x{image_size})")
  print(f"{'net':<12}{'B':>4} | {'no branches':>12}{'merge':>10}{'auto':>10} | "
        f"{'merge/plain':>12}{'auto/plain':>11}")
  for batch in batches:
    totals = np.zeros(3)
    for net, r in (("DT r=%d" % ratio, ratio), ("student", 1)):
      macs = np.asarray(network_macs(r, image_size, batch), np.float64)
      totals += macs
      print(f"{net:<12}{batch:>4} | {macs[0] / G:>12.2f}{macs[1] / G:>10.2f}{macs[2] / G:>10.2f} | "
            f"{macs[1] / macs[0]:>12.2f}{macs[2] / macs[0]:>11.2f}")
    print(f"{'DT+student':<12}{batch:>4} | {totals[0] / G:>12.2f}{totals[1] / G:>10.2f}"
          f"{totals[2] / G:>10.2f} | {totals[1] / totals[0]:>12.2f}{totals[2] / totals[0]:>11.2f}")
  print()


def random_variables(module, *args, seed=0, **kwargs):
  """Random values for every variable (shapes from an abstract init; NumPy values, no threefry)."""
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs), *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if getattr(path[-1], "key", None) == "var":
      return jnp.ones(leaf.shape, leaf.dtype)
    scale = 1.0 / np.sqrt(max(1, int(np.prod(leaf.shape[:-1]))))
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def compare_ms(fns: dict, args, reps: int) -> dict:
  """Best-of-``reps`` wall time in ms of each jitted fn, measured round-robin (fair under load)."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile
  best = {name: float("inf") for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
  return best


def time_layers(shapes, reps: int):
  print(f"== 3a. One 3x3 layer, jitted forward+backward (grads w.r.t. params and input), CPU, "
        f"best of {reps}, ms")
  print(f"{'B x H x W x C':<16} | {'auto runs':>9}{'fwd GMAC merge':>15}{'auto':>7} | "
        f"{'plain conv':>10}{'OREPA merge':>12}{'OREPA auto':>11}{'speed-up':>9}")
  for b, h, w, c in shapes:
    x = jnp.asarray(np.random.default_rng(1).standard_normal((b, h, w, c)), jnp.float32)
    variables = random_variables(OrepaConv(features=c), x)
    fns = {}
    for path in ("merge", "auto"):
      module = OrepaConv(features=c, branch_path=path)
      loss = lambda params, x, m=module: jnp.sum(
          m.apply({"params": params, "consts": variables["consts"]}, x) ** 2)
      fns[path] = jax.jit(jax.grad(loss, argnums=(0, 1)))
    plain = lambda params, x: jnp.sum(jax.lax.conv_general_dilated(
        x, params["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
    fns["plain"] = jax.jit(jax.grad(plain, argnums=(0, 1)))
    ms = compare_ms(fns, (variables["params"], x), reps)
    p = orepa_path_plan(c, c, False, b, h, w)
    run = ",".join(f"b{i}" for i in p.run) or "-"
    print(f"{f'{b}x{h}x{w}x{c}':<16} | {run:>9}{p.macs(run=()) / G:>15.3f}{p.macs() / G:>7.3f} | "
          f"{ms['plain']:>10.1f}{ms['merge']:>12.1f}{ms['auto']:>11.1f}{ms['merge'] / ms['auto']:>8.2f}x")
  print()


def _orepa_runs(model, x):
  """{block path: branches run on the activations} of the OREPA blocks of ``model`` for input ``x``."""
  plans = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, OrepaConv) and context.method_name == "__call__":
      plans["/".join(context.module.scope.path)] = context.module.path_plan(args[0].shape).run
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  return plans


def time_model_step(name: str, ratio: int, batch: int, image_size: int, reps: int):
  """DT forward (train-mode BN) + student-view forward, one gradient w.r.t. the DT params."""
  print(f"== 3b. GPD-style step of {name} (DT r={ratio} + student view, train-mode BN, fwd+bwd), "
        f"batch {batch}, {image_size}x{image_size}, CPU, best of {reps}, ms")
  x = jnp.asarray(np.random.default_rng(2).standard_normal((batch, image_size, image_size, 3)),
                  jnp.float32)
  labels = jnp.arange(batch) % 10
  steps = {}
  for label, branches, path in (("no branches", False, "auto"), ("merge", True, "merge"),
                                ("auto", True, "auto")):
    dt = models.create(name, 10, ratio=ratio, branches=branches)
    variables = random_variables(dt, x, train=False)
    dt_stats = variables.pop("batch_stats")
    view_model, _ = student_view(dt, variables, sample_input=x)
    student_stats = random_variables(view_model, x, train=False)["batch_stats"]

    def loss(params, dt=dt, dt_stats=dt_stats, student_stats=student_stats):
      logits_d, _ = dt.apply({**params, "batch_stats": dt_stats}, x, train=True,
                             mutable=["batch_stats"])
      view, view_params = student_view(dt, params, sample_input=x)
      logits_s, _ = view.apply({**view_params, "batch_stats": student_stats}, x, train=True,
                               mutable=["batch_stats"])
      ce = lambda z: -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(batch), labels])
      return ce(logits_d) + ce(logits_s)

    step = jax.jit(jax.grad(lambda params, loss=loss: loss(params)))
    with orepa_branch_path(path):  # read while the fresh function is traced (its first call)
      jax.block_until_ready(step(variables))
    steps[label] = (step, variables)
    if branches:
      runs = []
      with orepa_branch_path(path):
        for net, model in (("DT", dt), ("S", view_model)):
          plans = _orepa_runs(model, x)
          runs += [f"{net} {block} (b{',b'.join(map(str, run))})" for block, run in plans.items() if run]
      print(f"  {label}: {len(runs)} of {2 * len(plans)} OREPA blocks run branches on the "
            f"activations{': ' if runs else ''}{', '.join(runs)}")
  best = {label: float("inf") for label in steps}
  for _ in range(reps):  # round-robin over the three steps
    for label, (step, variables) in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(variables))
      best[label] = min(best[label], 1e3 * (time.perf_counter() - t0))
  results = best
  base = results["no branches"]
  print("  ".join(f"{k}: {v:.1f} ms ({v / base:.2f}x)" for k, v in results.items()))
  print()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ratio", type=int, default=2, help="DT width ratio r")
  parser.add_argument("--image-size", type=int, default=224, help="ResNet-18 input size (cost model)")
  parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--layer-shapes", default="2x7x7x512,8x7x7x512",
                      help="comma-separated BxHxWxC shapes for the measured single-layer timings")
  parser.add_argument("--model", default="resnet8x4", help="CIFAR model for the step timing, or 'none'")
  parser.add_argument("--model-batch", type=int, default=2)
  parser.add_argument("--model-image-size", type=int, default=32)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--no-timing", action="store_true", help="only print the cost model")
  args = parser.parse_args()

  t0 = time.perf_counter()
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"load average {load}\n")
  print_cost_table(args.ratio, args.image_size, args.batches)
  if not args.no_timing:
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.layer_shapes.split(",") if s]
    time_layers(shapes, args.reps)
    if args.model != "none":
      time_model_step(args.model, args.ratio, args.model_batch, args.model_image_size, args.reps)
  print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
