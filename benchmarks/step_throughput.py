"""Throughput of the jitted train step: CE, KD, DKD, DKD+GPD (r=2, with and without branches), and the
feature methods ReviewKD, ReviewKD+GPD, SP, FitNets, CRD.

    python benchmarks/step_throughput.py --student=resnet8x4 --teacher=resnet32x4 --batch=64 \
        --image_size=32 --num_classes=100 --dtype=float32 --out=benchmarks/results/cpu_cifar.json

For each method: ms/step and img/s of the real train step (``gpd_jax.step.make_train_step``: teacher
forward, DT + student-view forward/backward, optax update, EMA) on one fixed device batch, timed over
``--rounds`` round-robin rounds of ``--steps`` steps, all methods side by side in one process; the
step's FLOPs from XLA's cost analysis; and MFU when the device's peak is known. Prints the GPD/DKD
and ReviewKD+GPD/ReviewKD time ratios next to their FLOP ratios, and the with-/without-branches ratio.

    python benchmarks/step_throughput.py --student=resnet18 --teacher=resnet34 --batch=16 \
        --image_size=64 --num_classes=1000 --methods=reviewkd,reviewkd_gpd
"""
import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpd_jax import config_base, models, optim
from gpd_jax.models.layers import orepa_branch_path
from gpd_jax.state import DTYPES, build_task, init_state
from gpd_jax.step import make_train_step

# Dense peak FLOP/s per device (vendor datasheets, SXM parts). float32 uses TF32 tensor cores only
# when XLA is allowed to (the default matmul precision on GPU), so MFU is quoted against bf16/TF32.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
}

METHODS = {
    "ce": dict(base="ce", teacher=False, gpd=False, branches=False),
    "kd": dict(base="kd", teacher=True, gpd=False, branches=False),
    "dkd": dict(base="dkd", teacher=True, gpd=False, branches=False),
    "dkd_gpd": dict(base="dkd", teacher=True, gpd=True, branches=False),
    "dkd_gpd_branches": dict(base="dkd", teacher=True, gpd=True, branches=True),
    # The same step with every OREPA kernel merged (the reference code's forward), for the
    # effect of the per-layer path choice.
    "dkd_gpd_branches_merge": dict(base="dkd", teacher=True, gpd=True, branches=True, path="merge"),
    # Feature distillation (gpd_jax/feature_kd.py), CE as the logit loss. ReviewKD + GPD as the paper
    # runs it: OREPA branches, one ABF stack for the student and one for the DT.
    "reviewkd": dict(base="ce", teacher=True, gpd=False, branches=False, features="reviewkd"),
    "reviewkd_gpd": dict(base="ce", teacher=True, gpd=True, branches=True, features="reviewkd"),
    "sp": dict(base="ce", teacher=True, gpd=False, branches=False, features="sp"),
    "fitnet": dict(base="ce", teacher=True, gpd=False, branches=False, features="fitnet"),
    "crd": dict(base="ce", teacher=True, gpd=False, branches=False, features="crd"),
}
# CRD's memory bank size in the benchmark (its cost does not depend on N beyond the gathers).
CRD_NUM_DATA = 1024


def method_config(args, method):
  m = METHODS[method]
  c = config_base.base_config()
  c.model.name = args.student
  if args.student_kwargs:
    c.model.kwargs = {k: int(v) for k, v in (kv.split("=") for kv in args.student_kwargs.split(","))}
  c.model.dtype = args.dtype
  c.loss.base = m["base"]
  if m["gpd"]:
    config_base.gpd_on(c, ratio=args.ratio, branches=m["branches"])
  c.optim.clip_norm = 5.0
  c.ema_decay = 0.9999 if m["gpd"] else 0.0
  c.schedule.name = "constant"
  if m.get("features"):
    c.features.method = m["features"]
    c.features.crd.num_negatives = args.crd_negatives
  return c, m


def peak_flops(dtype):
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_FLOPS.items():
    if name in kind:
      return peaks.get(dtype)
  return None


def compile_method(args, method, batch, teacher, teacher_variables):
  """(run, info): ``run(n)`` times n steps and returns seconds per step; info has FLOPs, compile s."""
  config, m = method_config(args, method)
  shape = (1, args.image_size, args.image_size, args.channels)
  labels = None
  if m.get("features") == "crd":  # a labelled "training set" for the memory bank and the negatives
    labels = np.arange(CRD_NUM_DATA) % args.num_classes
  task = build_task(config, num_classes=args.num_classes, sample_shape=shape,
                    teacher=teacher if m["teacher"] else None, train_labels=labels)
  schedule = optim.make_schedule(config.schedule, steps_per_epoch=1, total_steps=1)
  tx = optim.make_optimizer(config.optim, schedule)
  holder = {"state": jax.jit(lambda r: init_state(task, config, tx, r))(jax.random.key(0, impl="rbg"))}
  step = jax.jit(make_train_step(task, tx, schedule, config.ema_decay), donate_argnums=(0,))
  tv = teacher_variables if m["teacher"] else None
  t0 = time.perf_counter()
  with orepa_branch_path(m.get("path", args.branch_path)):  # read while tracing
    compiled = step.lower(holder["state"], batch, tv).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  def run(n):
    state = holder["state"]
    state, metrics = compiled(state, batch, tv)  # not timed: absorbs any pending work
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, batch, tv)
    jax.block_until_ready((state, metrics))
    holder["state"], holder["loss"] = state, float(metrics["total"])
    return (time.perf_counter() - start) / n

  return run, {"compile_s": compile_s, "flops": flops}


def bench(args, methods, batch, teacher, teacher_variables):
  """Compiles every method, then times them round-robin (``--rounds`` × ``--steps`` steps each), so
  a change of machine load hits all methods alike; reports the median round."""
  compiled = {m: compile_method(args, m, batch, teacher, teacher_variables) for m in methods}
  for run, _ in compiled.values():
    run(args.warmup)
  times = {m: [] for m in methods}
  for _ in range(args.rounds):
    for m in methods:
      times[m].append(compiled[m][0](args.steps))
  results = []
  peak = peak_flops(args.dtype)
  for m in methods:
    ms = 1e3 * float(np.median(times[m]))
    flops = compiled[m][1]["flops"]
    r = {"method": m, "ms_per_step": ms, "img_per_s": args.batch / ms * 1e3,
         "ms_per_step_rounds": [1e3 * t for t in times[m]], "compile_s": compiled[m][1]["compile_s"],
         "gflop_per_step": flops / 1e9, "tflop_per_s": flops / ms * 1e3 / 1e12}
    if peak:
      r["mfu"] = r["tflop_per_s"] * 1e12 / peak
    results.append(r)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--student", default="resnet8x4")
  parser.add_argument("--student_kwargs", default="", help="integer module overrides of the student, "
                      "e.g. patch_size=7,depth=3 (config.model.kwargs)")
  parser.add_argument("--teacher", default="resnet32x4")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=3)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--ratio", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--branch_path", default="auto", choices=("auto", "merge", "run"),
                      help="OREPA forward: per-layer choice, always merge, or always run")
  parser.add_argument("--crd_negatives", type=int, default=16384, help="CRD's K")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  methods = args.methods.split(",")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")

  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size,
                                                 args.channels)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, args.num_classes, args.batch), jnp.int32),
           "index": jnp.arange(args.batch, dtype=jnp.int32)}  # CRD's dataset indices
  teacher = models.create(args.teacher, args.num_classes, dtype=DTYPES[args.dtype])
  teacher_variables = jax.jit(lambda r: teacher.init(r, batch["image"][:1], train=False))(
      jax.random.key(1, impl="rbg"))

  device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} ({platform.node()})"
  print(f"# {args.teacher} -> {args.student}, batch {args.batch}, {args.image_size}px, "
        f"{args.dtype}, r={args.ratio}, OREPA path {args.branch_path}, device {device}, "
        f"median of {args.rounds} round-robin rounds of {args.steps} steps")
  print(f"{'method':<18}{'ms/step':>10}{'img/s':>10}{'GFLOP':>10}{'TFLOP/s':>10}{'MFU':>8}"
        f"{'compile s':>11}")
  results = bench(args, methods, batch, teacher, teacher_variables)
  for r in results:
    method = r["method"]
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    print(f"{method:<18}{r['ms_per_step']:>10.1f}{r['img_per_s']:>10.1f}{r['gflop_per_step']:>10.2f}"
          f"{r['tflop_per_s']:>10.3f}{mfu:>8}{r['compile_s']:>11.1f}", flush=True)
  by = {r["method"]: r for r in results}
  ratios = {}
  for gpd, base in (("dkd_gpd", "dkd"), ("dkd_gpd_branches", "dkd"), ("reviewkd_gpd", "reviewkd")):
    if gpd in by and base in by:
      ratios[f"{gpd}/{base}"] = {"time": by[gpd]["ms_per_step"] / by[base]["ms_per_step"],
                                 "flops": by[gpd]["gflop_per_step"] / by[base]["gflop_per_step"]}
  for branched in ("dkd_gpd_branches", "dkd_gpd_branches_merge"):
    if "dkd_gpd" in by and branched in by:
      ratios[f"{branched}/dkd_gpd"] = {
          "time": by[branched]["ms_per_step"] / by["dkd_gpd"]["ms_per_step"],
          "flops": by[branched]["gflop_per_step"] / by["dkd_gpd"]["gflop_per_step"]}
  for name, r in ratios.items():
    print(f"ratio {name}: time {r['time']:.2f}x, FLOPs {r['flops']:.2f}x")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "device": device, "jax": jax.__version__, "results": results,
                 "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
  main()
