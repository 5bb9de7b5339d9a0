"""Throughput of the jitted train step: CE, KD, DKD and DKD+GPD (r=2, with and without branches).

    python benchmarks/step_throughput.py --student=resnet8x4 --teacher=resnet32x4 --batch=64 \
        --image_size=32 --num_classes=100 --dtype=float32 --out=benchmarks/results/cpu_cifar.json

For each method: ms/step and img/s of the real train step (``gpd_jax.step.make_train_step``: teacher
forward, DT + student-view forward/backward, optax update, EMA) on one fixed device batch, timed over
``--steps`` steps after ``--warmup`` compiled ones, all methods side by side in one process; the
step's FLOPs from XLA's cost analysis; and MFU when the device's peak is known. Prints the GPD/DKD
time ratio next to the FLOP ratio, and the with-/without-branches ratio.
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
}


def method_config(args, method):
  m = METHODS[method]
  c = config_base.base_config()
  c.model.name = args.student
  c.model.dtype = args.dtype
  c.loss.base = m["base"]
  if m["gpd"]:
    config_base.gpd_on(c, ratio=args.ratio, branches=m["branches"])
  c.optim.clip_norm = 5.0
  c.ema_decay = 0.9999 if m["gpd"] else 0.0
  c.schedule.name = "constant"
  return c, m


def peak_flops(dtype):
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_FLOPS.items():
    if name in kind:
      return peaks.get(dtype)
  return None


def bench_method(args, method, batch, teacher, teacher_variables):
  config, m = method_config(args, method)
  shape = (1, args.image_size, args.image_size, args.channels)
  task = build_task(config, num_classes=args.num_classes, sample_shape=shape,
                    teacher=teacher if m["teacher"] else None)
  schedule = optim.make_schedule(config.schedule, steps_per_epoch=1, total_steps=1)
  tx = optim.make_optimizer(config.optim, schedule)
  state = jax.jit(lambda r: init_state(task, config, tx, r))(jax.random.key(0, impl="rbg"))
  step = jax.jit(make_train_step(task, tx, schedule, config.ema_decay), donate_argnums=(0,))
  tv = teacher_variables if m["teacher"] else None
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, tv).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch, tv)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, tv)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  ms = 1e3 * float(np.median(times))
  result = {"method": method, "ms_per_step": ms, "img_per_s": args.batch / ms * 1e3,
            "compile_s": compile_s, "gflop_per_step": flops / 1e9,
            "tflop_per_s": flops / ms * 1e3 / 1e12, "loss": float(metrics["total"])}
  peak = peak_flops(args.dtype)
  if peak:
    result["mfu"] = result["tflop_per_s"] * 1e12 / peak
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--student", default="resnet8x4")
  parser.add_argument("--teacher", default="resnet32x4")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--channels", type=int, default=3)
  parser.add_argument("--num_classes", type=int, default=100)
  parser.add_argument("--ratio", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  methods = args.methods.split(",")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")

  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size,
                                                 args.channels)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, args.num_classes, args.batch), jnp.int32)}
  teacher = models.create(args.teacher, args.num_classes, dtype=DTYPES[args.dtype])
  teacher_variables = jax.jit(lambda r: teacher.init(r, batch["image"][:1], train=False))(
      jax.random.key(1, impl="rbg"))

  device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} ({platform.node()})"
  print(f"# {args.teacher} -> {args.student}, batch {args.batch}, {args.image_size}px, "
        f"{args.dtype}, r={args.ratio}, device {device}, {args.steps} timed steps")
  print(f"{'method':<18}{'ms/step':>10}{'img/s':>10}{'GFLOP':>10}{'TFLOP/s':>10}{'MFU':>8}"
        f"{'compile s':>11}")
  results = []
  for method in methods:
    r = bench_method(args, method, batch, teacher, teacher_variables)
    results.append(r)
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    print(f"{method:<18}{r['ms_per_step']:>10.1f}{r['img_per_s']:>10.1f}{r['gflop_per_step']:>10.2f}"
          f"{r['tflop_per_s']:>10.3f}{mfu:>8}{r['compile_s']:>11.1f}", flush=True)
  by = {r["method"]: r for r in results}
  ratios = {}
  for gpd in ("dkd_gpd", "dkd_gpd_branches"):
    if gpd in by and "dkd" in by:
      ratios[f"{gpd}/dkd"] = {"time": by[gpd]["ms_per_step"] / by["dkd"]["ms_per_step"],
                              "flops": by[gpd]["gflop_per_step"] / by["dkd"]["gflop_per_step"]}
  if "dkd_gpd" in by and "dkd_gpd_branches" in by:
    ratios["branches/no_branches"] = {
        "time": by["dkd_gpd_branches"]["ms_per_step"] / by["dkd_gpd"]["ms_per_step"],
        "flops": by["dkd_gpd_branches"]["gflop_per_step"] / by["dkd_gpd"]["gflop_per_step"]}
  for name, r in ratios.items():
    print(f"ratio {name}: time {r['time']:.2f}x, FLOPs {r['flops']:.2f}x")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "device": device, "jax": jax.__version__, "results": results,
                 "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
  main()
