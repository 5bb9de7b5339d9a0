"""Checks IR and CBR on full-size models; exits non-zero if a bound fails.

    python launch/verify_transforms.py
    python launch/verify_transforms.py --models=resnet8x4 --ratios=2,3,4 --tol=1e-5

For each model (10 classes; ImageNet models on ``--imagenet_size`` inputs, CIFAR models on 32×32,
vision transformers on their ``image_size``):

1. a random student (``model.init``) whose BatchNorm running statistics are randomized around the
   batch statistics of the test batch (so eval-mode BN is not the identity and the logits are O(1));
2. IR with noise 0, for every ratio, without branches and with zero-scaled (pre-trained) branches
   (CNNs only: the shipped transformers have no convs that take branches): max |DT − S| of the
   eval-mode logits;
3. every DT parameter and constant perturbed by ``--perturb`` × its RMS (this also activates every
   OREPA branch through its scaling v), then CBR export: max |export − view| of the eval-mode logits,
   the view being the training-time student (``student_view``) with the student's statistics.

Prints a markdown table. Everything runs in float32 under ``jax.jit`` with XLA's default options.
"""
import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpd_jax import models
from gpd_jax import transforms
from gpd_jax.models import layers
from gpd_jax.models.vit import RobustViT, VisionTransformer

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v1")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--models", default="resnet18,mobilenet_v1,resnet8x4",
                      help="comma-separated model names (gpd_jax.models.MODEL_NAMES)")
  parser.add_argument("--ratios", default="2,3", help="comma-separated expansion ratios")
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--imagenet_size", type=int, default=224, help="input size of ImageNet models")
  parser.add_argument("--cifar_size", type=int, default=32, help="input size of CIFAR models")
  parser.add_argument("--perturb", type=float, default=0.05,
                      help="DT perturbation before export, as a fraction of each leaf's RMS")
  parser.add_argument("--tol", type=float, default=1e-5, help="bound on both max|·| columns")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  args.ratios = [int(r) for r in args.ratios.split(",") if r]
  return args


def rng_key(seed: int) -> jax.Array:
  # RBG keys: XLA:CPU compiles threefry-based initialisers of a whole network very slowly.
  return jax.random.key(seed, impl="rbg")


@functools.lru_cache(maxsize=None)
def eval_logits_fn(model):
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def randomize_batch_stats(model, variables, x, seed: int):
  """Running statistics = the batch statistics of ``x``, means shifted by N(0, (0.2σ)²), variances
  scaled by U(0.5, 2)."""
  if not variables.get("batch_stats"):  # no BatchNorm (DeiT)
    return {**variables, "batch_stats": {}}
  _, updated = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  momentum = layers.BN_MOMENTUM  # new = momentum·old + (1 − momentum)·batch
  old = transforms.flatten(variables["batch_stats"])
  new = transforms.flatten(updated["batch_stats"])
  rs = np.random.default_rng(seed)
  stats = {}
  for key in sorted(k for k in old if k.endswith("/mean")):
    module = key[:-len("/mean")]
    batch = {s: (np.asarray(new[f"{module}/{s}"]) - momentum * np.asarray(old[f"{module}/{s}"]))
             / (1 - momentum) for s in ("mean", "var")}
    var = np.maximum(batch["var"], 0.0) + 0.05
    stats[key] = (batch["mean"] + 0.2 * np.sqrt(var) * rs.normal(size=var.shape)).astype(np.float32)
    stats[f"{module}/var"] = (var * rs.uniform(0.5, 2.0, var.shape)).astype(np.float32)
  return {**variables, "batch_stats": transforms.unflatten(stats)}


def perturb(tree, scale: float, key: jax.Array):
  """Adds noise of ``scale`` × the leaf's RMS (at least 0.1) to every leaf; one jitted program."""

  def run(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = []
    for leaf, k in zip(leaves, keys):
      std = scale * jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(leaf))), 0.1)
      out.append(leaf + std * jax.random.normal(k, leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, out)

  return jax.jit(run)(tree, key)


def jit_transform(fn, *args):
  """Runs ``fn(*args) -> (module, tree)`` under jit; the module is captured while tracing."""
  modules = []

  def run(*a):
    module, tree = fn(*a)
    modules.append(module)
    return tree

  tree = jax.jit(run)(*args)
  return modules[0], tree


def max_abs_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def check_model(name: str, args):
  """Yields one result row per (ratio, branches)."""
  model = models.create(name, args.num_classes)
  transformer = isinstance(model, (VisionTransformer, RobustViT))
  size = (model.image_size if transformer else
          args.imagenet_size if name in IMAGENET_MODELS else args.cifar_size)
  x = jnp.asarray(np.random.default_rng(args.seed).normal(size=(args.batch, size, size, 3)),
                  jnp.float32)
  variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(rng_key(args.seed))
  variables = randomize_batch_stats(model, variables, x, args.seed)
  z_student = eval_logits_fn(model)(variables, x)
  for ratio in args.ratios:
    for branches in ((False,) if transformer else (False, True)):
      start = time.time()
      dt_model, dt_variables = jit_transform(lambda v, k, r=ratio, b=branches: transforms.expand(
          model, v, ratio=r, rng=k, noise_std=0.0, branches=b, pretrained=True, sample_input=x),
                                             variables, rng_key(args.seed + 1))
      ir_error = max_abs_diff(eval_logits_fn(dt_model)(dt_variables, x), z_student)
      dt_params = {c: v for c, v in dt_variables.items() if c != "batch_stats"}
      dt_params = perturb(dt_params, args.perturb, rng_key(args.seed + 2))
      del dt_variables
      plain_model, plain_variables = jit_transform(
          lambda p, s, m=dt_model: transforms.export_student(m, p, s, sample_input=x),
          dt_params, variables["batch_stats"])
      view_model, view_params = jit_transform(
          lambda p, m=dt_model: transforms.student_view(m, p, sample_input=x), dt_params)
      z_view = eval_logits_fn(view_model)({**view_params, "batch_stats": variables["batch_stats"]}, x)
      z_plain = eval_logits_fn(plain_model)(plain_variables, x)
      assert plain_model == model, (plain_model, model)
      yield dict(model=name, input=f"{args.batch}×{size}×{size}×3", ratio=ratio, branches=branches,
                 dt_params=sum(int(np.prod(a.shape)) for a in jax.tree.leaves(dt_params["params"])),
                 ir_error=ir_error, export_error=max_abs_diff(z_plain, z_view),
                 logit_scale=float(np.max(np.abs(np.asarray(z_view)))),
                 seconds=time.time() - start)


def main(argv=None) -> int:
  args = parse_args(argv)
  header = ("| model | input | r | branches | DT params | max\\|DT − S\\| (IR) "
            "| max\\|export − view\\| (CBR) | max\\|logit\\| | ok | s |")
  print(header)
  print("|" + "---|" * header.count(" | ") + "---|")
  failed = 0
  for name in args.models:
    for row in check_model(name, args):
      ok = row["ir_error"] <= args.tol and row["export_error"] <= args.tol
      failed += not ok
      print(f"| {row['model']} | {row['input']} | {row['ratio']} | {'yes' if row['branches'] else 'no'} "
            f"| {row['dt_params']:,} | {row['ir_error']:.2e} | {row['export_error']:.2e} "
            f"| {row['logit_scale']:.2f} | {'yes' if ok else '**NO**'} | {row['seconds']:.0f} |",
            flush=True)
  print(f"\n{'all within' if not failed else f'{failed} rows exceed'} tol={args.tol:g}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
