"""A user's own Flax model trains through the CLI: ``models.register`` in a config file, or a
``'package.module:Callable'`` model name.

The model lives in a module written to ``tmp_path`` (outside gpd_jax), like a user's own code.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpd_jax import checkpoint, models, train
from gpd_jax.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# conv -> BN -> ReLU -> conv -> BN -> ReLU -> global average pool -> dense; no OREPA `branches` field.
MODEL_SOURCE = textwrap.dedent('''
    from typing import Any

    import flax.linen as nn
    import jax.numpy as jnp


    class TinyNet(nn.Module):
      num_classes: int
      width: int = 4
      ratio: int = 1  # 1: the student; r: its dynamic teacher
      dtype: Any = jnp.float32

      @nn.compact
      def __call__(self, x, train: bool = False):
        width = self.width * self.ratio
        for i in range(2):
          x = nn.Conv(width * (i + 1), (3, 3), strides=2 - i, use_bias=False, dtype=self.dtype,
                      name=f"conv{i}")(x)
          bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name=f"bn{i}")
          x = nn.relu(bn(x * self.ratio) / self.ratio)  # the activation-scale rule
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)
''')

CONFIG_SOURCE = textwrap.dedent('''
    from gpd_jax import config_base, models
    from my_models import TinyNet

    models.register("tiny_net", TinyNet)


    def get_config(arg=None):
      c = config_base.base_config()
      c.seed = 1
      c.batch_size = 8
      c.eval_batch_size = 8
      c.num_train_steps = 3
      c.log_every_steps = 1
      c.model.name = arg or "tiny_net"
      c.model.kwargs = {"width": 4}
      c.dataset.name = "synthetic"
      c.dataset.image_shape = (18, 18, 3)
      c.dataset.image_size = 16
      c.dataset.num_classes = 5
      c.dataset.synthetic_sizes = {"train": 32, "validation": 12}
      c.dataset.eval_splits = {"val": "validation"}
      c.dataset.num_threads = 0
      c.schedule.name = "constant"
      c.loss.base = "ce"
      config_base.gpd_on(c, ratio=2, branches=False)
      return c
''')


@pytest.fixture
def user_code(tmp_path, monkeypatch):
  """Writes my_models.py and the config; puts them on sys.path and PYTHONPATH like a user would."""
  code = tmp_path / "code"
  code.mkdir()
  (code / "my_models.py").write_text(MODEL_SOURCE)
  (code / "my_config.py").write_text(CONFIG_SOURCE)
  monkeypatch.syspath_prepend(str(code))
  monkeypatch.delitem(sys.modules, "my_models", raising=False)  # import this test's copy
  registered = dict(models._REGISTERED)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), ROOT, os.environ.get("PYTHONPATH", "")])}
  yield code, env
  models._REGISTERED.clear()  # each test starts from the shipped models only
  models._REGISTERED.update(registered)
  sys.modules.pop("my_models", None)


def run_launcher(script, args, env):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                          capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_registered_model_trains_through_the_launcher_and_exports(tmp_path, user_code):
  code, env = user_code
  workdir = tmp_path / "run"
  config_arg = f"--config={code / 'my_config.py'}"
  run_launcher("train.py", [config_arg, f"--workdir={workdir}"], env)

  train_records = read_metrics(str(workdir), "train")
  assert [r["step"] for r in train_records] == [1, 2, 3]
  assert all(np.isfinite(r["sce_S"]) and np.isfinite(r["ce_D"]) for r in train_records)  # GPD was on
  val = read_metrics(str(workdir), "eval/val")[-1]
  assert "top1_D" in val

  # The export is the plain custom student (CBR), and loads again in a fresh process through the config.
  with open(workdir / "export" / "model.json") as f:
    assert json.load(f)["name"] == "tiny_net"
  result = run_launcher("eval.py", [config_arg, f"--export={workdir / 'export'}"], env)
  exported = json.loads(result.stdout[result.stdout.index("{"):])
  np.testing.assert_allclose(exported["val"]["top1"], val["top1_S"])
  np.testing.assert_allclose(exported["val"]["ce"], val["ce_S"], rtol=1e-5)

  from my_models import TinyNet  # noqa: E402 (on sys.path through the fixture)
  models.register("tiny_net", TinyNet)
  module, variables, _ = checkpoint.load_export(str(workdir))
  assert type(module) is TinyNet and module.ratio == 1
  assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 4, 8)  # student width, not ×2


def test_module_path_model_name_trains_in_process(tmp_path, user_code):
  code, _ = user_code
  config = train.load_config_file(f"{code / 'my_config.py'}:my_models:TinyNet")
  config.num_train_steps = 2
  assert config.model.name == "my_models:TinyNet"
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  module, _, info = checkpoint.load_export(str(tmp_path / "run"))
  assert info["name"] == "my_models:TinyNet" and type(module).__name__ == "TinyNet"
  exported = train.evaluate_export(config, str(tmp_path / "run"))
  np.testing.assert_allclose(exported["val"]["top1"], final["eval"]["val"]["top1_S"])


def test_register_rules(user_code):
  from my_models import TinyNet  # noqa: E402
  models.register("tiny_rules", TinyNet)
  models.register("tiny_rules", TinyNet)  # the same constructor again: a no-op
  assert "tiny_rules" in models.available_names() and "tiny_rules" not in models.MODEL_NAMES
  module = models.create("tiny_rules", 7, width=3)
  assert (type(module), module.num_classes, module.width) == (TinyNet, 7, 3)
  with pytest.raises(ValueError, match="already registered"):
    models.register("tiny_rules", lambda **kw: TinyNet(**kw))
  with pytest.raises(ValueError, match="shipped model"):
    models.register("resnet8", TinyNet)
  with pytest.raises(ValueError, match="without ':'"):
    models.register("a:b", TinyNet)
  with pytest.raises(ValueError, match="callable"):
    models.register("not_callable", 3)


@pytest.mark.parametrize("name, match", [
    ("no_such_module_xyz:Net", "cannot import 'no_such_module_xyz'.*PYTHONPATH"),
    ("my_models:NoSuchNet", "has no callable 'NoSuchNet'"),
    (":Net", "package.module:Callable"),
    ("tiny_unregistered", "unknown model name 'tiny_unregistered'.*register"),
])
def test_bad_model_names_say_what_to_fix(user_code, name, match):
  with pytest.raises(ValueError, match=match):
    models.create(name, 10)


def test_constructor_without_the_config_fields_is_named(user_code, tmp_path):
  config = train.load_config_file(f"{user_code[0] / 'my_config.py'}:my_models:TinyNet")
  config.model.kwargs = {"depth": 3}  # TinyNet has no such field
  with pytest.raises(ValueError, match="config.model.*my_models:TinyNet.*depth"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config = train.load_config_file(f"{user_code[0] / 'my_config.py'}:my_models:TinyNet")
  config.gpd.branches = True  # TinyNet has no OREPA blocks
  with pytest.raises(ValueError, match="config.gpd.branches"):
    train.train_and_evaluate(config, str(tmp_path / "run2"))
