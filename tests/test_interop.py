"""PyTorch interop against real PyTorch: torchvision models (ImageNet family) and PyTorch modules
written in tests/torch_utils.py from the published definitions (RepDistiller CIFAR ResNet / WRN,
the GPD reference MobileNetV1).

Every architecture: random weights with non-trivial BN statistics in torch -> file -> our model gives
the same eval-mode logits (<= 1e-4 of the logits' scale), and torch -> ours -> torch is bitwise.
"""
import importlib.util
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from gpd_jax import checkpoint, interop, models, train
from gpd_jax.interop import layouts
import torch_utils
from torch_utils import randomize, torch_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v1")
ALL_MODELS = tuple(sorted(interop.MODEL_LAYOUTS))
LOGIT_RTOL = 1e-4


def _load_convert_module():
  spec = importlib.util.spec_from_file_location("convert", os.path.join(ROOT, "launch", "convert.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


convert = _load_convert_module()


def image_size(name):
  if name.startswith("deit"):
    return 224  # the size the model is built for (its position embedding)
  return 64 if name in IMAGENET_MODELS else 32


def numpy_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_logits(model, images_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))).numpy()


def images(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def max_relative_logit_diff(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


# ----------------------------------------------------------------------------------------------
# Names, shapes, logits, round trips.


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_tensor_maps_onto_the_pytorch_definition(name):
  """Our variables <-> the PyTorch module's state_dict: the same names, shapes and values."""
  size = image_size(name)
  reference = randomize(torch_model(name, 10, image_size=size), seed=1)
  state_dict = numpy_state_dict(reference)
  abstract = interop.abstract_variables(models.create(name, 10), (1, size, size, 3))
  back = interop.to_torch(name, interop.from_torch(name, state_dict, abstract, source="test"))
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      assert back[key].dtype == np.int64 and back[key] == 0  # not carried; written as 0
    else:
      assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


# torchvision for the ImageNet ResNets, the GPD MobileNetV1, and one or two of each CIFAR family
# (the other depths differ only in block counts, covered by the test above).
LOGIT_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v1", "resnet8", "resnet20",
                "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_1")


@pytest.mark.parametrize("name", LOGIT_MODELS)
def test_logits_match_pytorch_and_round_trip_is_bitwise(tmp_path, name):
  size = image_size(name)
  reference = randomize(torch_model(name, 10, image_size=size), seed=2)
  path = str(tmp_path / f"{name}.pth")
  torch.save(reference.state_dict(), path)

  module, variables, info = interop.load_torch_model(path, name, sample_shape=(1, size, size, 3))
  assert info["num_classes"] == 10 and module.num_classes == 10
  x = images(2, size)
  want = torch_logits(reference, x)
  got = module.apply(variables, x, train=False)
  assert max_relative_logit_diff(got, want) <= LOGIT_RTOL
  assert np.std(want) > 1e-3 * np.max(np.abs(want))  # logits are not all alike

  # Ours -> torch (.pth and .safetensors): the same bits, accepted by a strict load_state_dict.
  original = reference.state_dict()
  for suffix in (".pth", ".safetensors"):
    out = str(tmp_path / f"back{suffix}")
    interop.save_torch(out, name, variables)
    if suffix == ".pth":
      loaded = torch.load(out, map_location="cpu", weights_only=True)
    else:
      from safetensors.torch import load_file
      loaded = load_file(out)
    assert set(loaded) == set(original)
    for key, value in original.items():
      if not key.endswith("num_batches_tracked"):
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    fresh = torch_model(name, 10, image_size=size)
    fresh.load_state_dict(loaded, strict=True)
    assert np.array_equal(torch_logits(fresh.eval(), x), want)


def test_wrapped_checkpoints_and_all_file_formats(tmp_path):
  """{'model': ...} with DataParallel's 'module.' prefix, {'state_dict': ...}, an explicit key,
  .safetensors (no torch needed) and .npz all give the same variables."""
  reference = randomize(torch_model("resnet8", 7), seed=3)
  state = reference.state_dict()
  numpy_state = numpy_state_dict(reference)
  ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
  files = {
      "plain.pth": state,
      "repdistiller.pth": {"epoch": 240, "model": {f"module.{k}": v for k, v in state.items()},
                           "accuracy": 73.1},
      "torchvision_ref.pth.tar": {"state_dict": state, "optimizer": {"lr": 0.1}},
  }
  for filename, obj in files.items():
    torch.save(obj, str(tmp_path / filename))
  # The pre-1.6 (non-zip) format of the older torchvision checkpoints, e.g. resnet34-333f7ec4.pth.
  torch.save(state, str(tmp_path / "legacy.pth"), _use_new_zipfile_serialization=False)
  torch.save({"model": state, "model_ema": ema}, str(tmp_path / "ema.pth"))
  from safetensors.numpy import save_file
  save_file(numpy_state, str(tmp_path / "weights.safetensors"))
  np.savez(str(tmp_path / "weights.npz"), **numpy_state)

  def load(filename, **kw):
    _, variables, _ = interop.load_torch_model(str(tmp_path / filename), "resnet8", **kw)
    return variables

  want = load("plain.pth")
  for filename in list(files) + ["legacy.pth", "weights.safetensors", "weights.npz", "ema.pth"]:
    got = load(filename)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want)), filename
  # Half-precision files (bfloat16 through torch, float16 directly) are widened exactly to float32.
  from safetensors.torch import save_file as save_torch_file
  for dtype in (torch.bfloat16, torch.float16):
    save_torch_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                    str(tmp_path / "half.safetensors"))
    got = load("half.safetensors")
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"],
                                  state["fc.weight"].to(dtype).float().numpy().T)
    assert got["params"]["fc"]["kernel"].dtype == np.float32
  got = load("ema.pth", key="model_ema")
  np.testing.assert_array_equal(got["params"]["conv1"]["kernel"],
                                want["params"]["conv1"]["kernel"] + 1)


def test_convert_round_trip_through_an_export_is_bitwise(tmp_path):
  """launch/convert.py both ways: .pth -> export directory -> .pth / .safetensors, same bits."""
  reference = randomize(torch_model("wrn_16_2", 100), seed=8)
  torch.save({"state_dict": reference.state_dict()}, str(tmp_path / "wrn.pth.tar"))
  info = convert.torch_to_export(str(tmp_path / "wrn.pth.tar"), str(tmp_path / "export"),
                                 "wrn_16_2", image_size=40)
  assert info == {"name": "wrn_16_2", "num_classes": 100, "kwargs": {},
                  "input_shape": [1, 40, 40, 3]}
  module, variables, _ = checkpoint.load_export(str(tmp_path / "export"))
  x = images(2, 32, seed=9)
  assert max_relative_logit_diff(module.apply(variables, x, train=False),
                                 torch_logits(reference, x)) <= LOGIT_RTOL
  for out in ("back.pth", "back.safetensors"):
    written = convert.export_to_torch(str(tmp_path), str(tmp_path / out))  # a workdir works too
    assert set(written) == set(reference.state_dict())
    loaded = interop.read_state_dict(str(tmp_path / out))
    for key, value in reference.state_dict().items():
      if not key.endswith("num_batches_tracked"):
        assert np.array_equal(loaded[key], value.numpy()), key
  with pytest.raises(ValueError, match="unknown weight file type"):
    convert.export_to_torch(str(tmp_path), str(tmp_path / "back.onnx"))
  assert not (tmp_path / "back.onnx").exists()
  # A narrow variant needs its module overrides, which model.json records.
  narrow = randomize(torch_model("resnet8", 5, widths=(4, 4, 8, 8)), seed=11)
  torch.save(narrow.state_dict(), str(tmp_path / "narrow.pth"))
  info = convert.torch_to_export(str(tmp_path / "narrow.pth"), str(tmp_path / "narrow"), "resnet8",
                                 module_kwargs={"widths": [4, 4, 8, 8]})
  assert info["kwargs"] == {"widths": [4, 4, 8, 8]}
  module, variables, _ = checkpoint.load_export(str(tmp_path / "narrow"))
  assert max_relative_logit_diff(module.apply(variables, x, train=False),
                                 torch_logits(narrow, x)) <= LOGIT_RTOL


def test_safetensors_and_npz_need_no_torch(tmp_path):
  """The library never imports torch for .safetensors/.npz (checked in a fresh interpreter)."""
  reference = randomize(torch_model("resnet8", 5), seed=4)
  from safetensors.numpy import save_file
  save_file(numpy_state_dict(reference), str(tmp_path / "w.safetensors"))
  np.savez(str(tmp_path / "w.npz"), **numpy_state_dict(reference))
  code = (
      "import sys\n"
      "from gpd_jax import interop\n"
      f"for f in ('w.safetensors', 'w.npz'):\n"
      f"  _, v, _ = interop.load_torch_model({str(tmp_path)!r} + '/' + f, 'resnet8')\n"
      f"  interop.save_torch({str(tmp_path)!r} + '/out_' + f, 'resnet8', v)\n"
      "assert 'torch' not in sys.modules, 'torch was imported'\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  again = interop.read_state_dict(str(tmp_path / "out_w.safetensors"))
  for key, value in numpy_state_dict(reference).items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(again[key], value)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file, the first offending keys with both shapes, and the
# expected architecture; nothing written.


def _convert_fails(tmp_path, source, model, match, **kw):
  out = tmp_path / "out_export"
  with pytest.raises(ValueError) as e:
    convert.torch_to_export(str(source), str(out), model, **kw)
  assert not out.exists(), "something was written"
  message = str(e.value)
  assert str(source) in message, message
  for pattern in match:
    assert pattern in message, f"{pattern!r} not in: {message}"
  return message


def test_checkpoint_of_another_architecture(tmp_path):
  path = tmp_path / "resnet50.pth"
  torch.save(torch_model("resnet50", 1000).state_dict(), str(path))
  _convert_fails(tmp_path, path, "resnet34", [
      "not a 'resnet34' state_dict as torchvision's ResNet", "85 unexpected keys",
      "layer1.0.conv3.weight", "tensors with other shapes",
      "layer1.0.conv1.weight: file [64, 64, 1, 1] vs expected [64, 64, 3, 3]",
      "looks like a 'resnet50' state_dict"])


def test_missing_and_unexpected_keys(tmp_path):
  state = torch_model("resnet8", 10).state_dict()
  del state["layer2.0.bn1.running_var"]
  state["layer9.0.conv1.weight"] = torch.zeros(1)
  path = tmp_path / "broken.pth"
  torch.save(state, str(path))
  _convert_fails(tmp_path, path, "resnet8", [
      "1 missing keys (layer2.0.bn1.running_var)", "1 unexpected keys (layer9.0.conv1.weight)",
      "RepDistiller/mdistiller's CIFAR ResNet"])


def test_wrong_number_of_classes(tmp_path):
  path = tmp_path / "cifar10_teacher.pth"
  torch.save({"model": torch_model("resnet32x4", 10).state_dict()}, str(path))
  _convert_fails(tmp_path, path, "resnet32x4", [
      "fc.weight: file [10, 256] vs expected [100, 256]", "fc.bias: file [10] vs expected [100]",
      "classifier has 10 classes but 100 are expected"], num_classes=100)


def test_file_needing_arbitrary_unpickling_is_refused(tmp_path):
  path = tmp_path / "whole_model.pth"
  torch.save(torch_model("resnet8", 10), str(path))  # a pickled nn.Module, not a state_dict
  _convert_fails(tmp_path, path, "resnet8", ["refusing to load", "arbitrary unpickling",
                                             "model.state_dict()"])
  npz = tmp_path / "objects.npz"
  np.savez(str(npz), a=np.array([{"x": 1}], dtype=object))
  _convert_fails(tmp_path, npz, "resnet8", ["refusing to load", "arbitrary unpickling"])


@pytest.mark.parametrize("suffix", [".pth", ".legacy.pth", ".safetensors", ".npz"])
def test_truncated_file(tmp_path, suffix):
  state = numpy_state_dict(torch_model("resnet8", 10))
  full = tmp_path / f"full{suffix}"
  if suffix.endswith(".pth"):
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(full),
               _use_new_zipfile_serialization=suffix == ".pth")
  else:
    interop.write_state_dict(str(full), state)
  data = full.read_bytes()
  for cut in (len(data) // 2, 5000, 100):  # damaged at different places, different low-level errors
    path = tmp_path / f"truncated{cut}{suffix}"
    path.write_bytes(data[:cut])
    _convert_fails(tmp_path, path, "resnet8", ["truncated or corrupt"])


def test_other_bad_inputs(tmp_path):
  torch.save({"epoch": 3, "best_acc": 71.2}, str(tmp_path / "no_weights.pth"))
  _convert_fails(tmp_path, tmp_path / "no_weights.pth", "resnet8",
                 ["holds no state_dict", "'best_acc', 'epoch'"])
  _convert_fails(tmp_path, tmp_path / "nowhere.pth", "resnet8", ["no such file"])
  (tmp_path / "w.h5").write_bytes(b"x")
  _convert_fails(tmp_path, tmp_path / "w.h5", "resnet8", ["unknown weight file type"])
  integer = torch_model("resnet8", 10).state_dict()
  integer["conv1.weight"] = integer["conv1.weight"].long()
  torch.save(integer, str(tmp_path / "integer.pth"))
  _convert_fails(tmp_path, tmp_path / "integer.pth", "resnet8",
                 ["1 non-float tensors (conv1.weight (int64))"])
  torch.save(torch_model("resnet8", 10).state_dict(), str(tmp_path / "r8.pth"))
  _convert_fails(tmp_path, tmp_path / "r8.pth", "resnet8", ["cannot build a 'resnet8'", "['width']"],
                 module_kwargs={"width": [4, 4, 8, 8]})
  with pytest.raises(ValueError, match="'vit_b16' has no PyTorch layout"):
    convert.torch_to_export(str(tmp_path / "r8.pth"), str(tmp_path / "o"), "vit_b16")
  # A DT with OREPA branches has no PyTorch layout; nothing is written.
  dt = models.create("resnet8", 10).clone(ratio=2, branches=True)
  dt_vars = dt.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  out = tmp_path / "dt.pth"
  with pytest.raises(ValueError, match=r"params/conv1/a1 .*convert.py --dt"):
    interop.save_torch(str(out), "resnet8", {k: v for k, v in dt_vars.items() if k != "consts"})
  assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Training: teacher.checkpoint and init.student take PyTorch files.


def test_teacher_checkpoint_with_other_classes_is_refused(tmp_path):
  from test_train import tiny_config
  config = tiny_config()
  path = tmp_path / "teacher.pth"
  torch.save(torch_model("resnet8", 7, widths=(4, 4, 8, 8)).state_dict(), str(path))
  config.teacher.checkpoint = str(path)
  config.teacher.model.kwargs = {"widths": (4, 4, 8, 8)}  # the file is a narrow resnet8
  with pytest.raises(ValueError, match=r"config.teacher.checkpoint: .*teacher.pth.* 7 classes but 5"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(tmp_path / "w" / "checkpoints")


def test_pretrained_student_from_a_pytorch_file(tmp_path):
  """GPD fine-tuning from a .pth student: at step 0 the DT's exported student is that network."""
  from test_train import tiny_config
  from gpd_jax.transforms import export_student
  reference = randomize(torch_model("resnet8", 5, image_size=16, widths=(4, 4, 8, 8)), seed=5)
  torch.save({"model": reference.state_dict()}, str(tmp_path / "student.pth"))
  config = tiny_config(gpd=True, teacher=False, branches=True)
  config.init.student = "student.pth"  # relative to the workdir
  config.gpd.pretrained_branches = True
  config.gpd.noise_std = 0.0
  workdir = str(tmp_path)
  run = train.setup(config, workdir)
  try:
    want_stats = reference.state_dict()["layer1.0.bn2.running_var"].numpy()
    np.testing.assert_array_equal(run.state.student_batch_stats["layer1_0"]["bn2"]["var"], want_stats)
    variables, student_stats = run.state.variables()
    plain_model, plain = export_student(run.task.model, variables, student_stats,
                                        spec=run.task.view_spec)
    x = images(4, 16, seed=6)
    assert max_relative_logit_diff(plain_model.apply(plain, x, train=False),
                                   torch_logits(reference, x)) <= LOGIT_RTOL
  finally:
    run.ckpt.close()
  config.model.name = "resnet14"
  config.init.student = str(tmp_path / "student.pth")  # an absolute path is taken as is
  with pytest.raises(ValueError, match=r"config.init.student: .*student.pth.*not a 'resnet14'"):
    train.setup(config, str(tmp_path / "other"))


def test_dynamic_teacher_to_a_wide_pytorch_network(tmp_path):
  """A GPD run's DT (r=2, OREPA branches, 2 training steps) -> RepDistiller's ResNet with ×2
  widths, loaded strictly: the same eval-mode logits as our DT."""
  from test_train import tiny_config
  config = tiny_config(gpd=True, teacher=False, branches=True)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  out = str(tmp_path / "dt.pth")
  convert.dt_to_torch_file(config, workdir, out)
  wide = torch_model("resnet8", 5, image_size=16, widths=(8, 8, 16, 16))
  wide.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
  run = train.setup(config, workdir, training=False)
  try:
    variables, _ = run.state.variables()
    x = images(4, 16, seed=10)
    ours = run.task.model.apply(variables, x, train=False)
  finally:
    run.ckpt.close()
  assert max_relative_logit_diff(ours, torch_logits(wide.eval(), x)) <= LOGIT_RTOL
  config.gpd.enabled = False
  with pytest.raises(ValueError, match="no dynamic teacher"):
    convert.dt_to_torch_file(config, workdir, str(tmp_path / "none.pth"))
  assert not (tmp_path / "none.pth").exists()


# ----------------------------------------------------------------------------------------------
# The ImageNet path end to end, without ImageNet.


def write_fake_imagenet(data_dir, sizes, label_fn, seed=0):
  """A tiny imagenet2012 in the TFDS ArrayRecord layout (JPEG images, 1000 classes), written by
  TFDS' own imagenet2012 builder with its example generator replaced (no manual tars needed).

  ``label_fn(jpeg_bytes) -> int`` labels each image."""
  import tensorflow_datasets as tfds
  from etils import epath
  from PIL import Image
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet

  class FakeImagenet2012(imagenet.Builder, skip_registration=True):
    name = "imagenet2012"
    pkg_dir_path = epath.Path(imagenet.__file__).parent  # metadata of the real builder

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # TFDS would need importlib_resources to derive it
      return epath.Path(imagenet.__file__)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split, n):
      rng = np.random.default_rng([seed, len(split)])
      for i in range(n):
        h, w = rng.integers(36, 60, 2)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
        name = f"{split}_{i}.JPEG"
        yield name, {"file_name": name, "image": buf.getvalue(), "label": label_fn(buf.getvalue())}

  FakeImagenet2012(data_dir=data_dir).download_and_prepare(file_format="array_record")


def test_imagenet_gpd_with_a_torchvision_teacher_end_to_end(tmp_path):
  """configs/imagenet_gpd.py (shrunk) with teacher.checkpoint = a torchvision ResNet-34 .pth: train,
  evaluate, checkpoint, export; the export converted back loads in torchvision with our logits."""
  from PIL import Image
  from gpd_jax import data
  from gpd_jax.data import preprocess
  teacher = randomize(torch_model("resnet34", 1000), seed=7)
  torch.save(teacher.state_dict(), str(tmp_path / "resnet34-random.pth"))
  info = data.dataset_info("imagenet2012")

  def teacher_label(jpeg):
    """The torchvision teacher's class for the image as the eval pipeline will feed it."""
    image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    example = preprocess.eval_example({"image": image, "label": 0}, augment="imagenet", image_size=32)
    batch = preprocess.normalize_batch({"image": example["image"][None]}, mean=info.mean, std=info.std)
    return int(np.argmax(torch_logits(teacher, batch["image"])[0]))

  data_dir = str(tmp_path / "tfds")
  write_fake_imagenet(data_dir, {"train": 16, "validation": 8}, teacher_label)

  spec = importlib.util.spec_from_file_location("imagenet_gpd",
                                                os.path.join(ROOT, "configs", "imagenet_gpd.py"))
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  config = config_module.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.image_size = 32
  config.dataset.worker_count = 0
  config.dataset.num_threads = 0
  config.batch_size = config.eval_batch_size = 8
  # One device: the ×2 DT with OREPA branches of a full ResNet-18 holds ~0.7 GB of parameters
  # (×3 with momentum and EMA); replicated on 8 fake CPU devices it would not fit a CI runner.
  config.mesh.shape = (1,)
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.teacher.checkpoint = str(tmp_path / "resnet34-random.pth")
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(config, workdir)

  assert final["step"] == 2
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 2
  # The static teacher is the torchvision network: the labels are its predictions (a random
  # network, or a mis-converted one, would score ~0.1 %).
  assert final["eval"]["val"]["top1_T"] == 100.0
  for key in ("top1_S", "top1_D", "top1_S_ema", "agree_S_T"):
    assert 0.0 <= final["eval"]["val"][key] <= 100.0, key
  eval_images = np.concatenate([b["image"] for b in data.create_eval_iterator(config, "validation")])

  # The exported student, converted to a torchvision state_dict by the CLI, computes our logits.
  out = str(tmp_path / "student.pth")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "convert.py"),
                           os.path.join(workdir, "export"), out],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  student = torch_utils.import_torchvision().models.resnet18(num_classes=1000)
  student.load_state_dict(torch.load(out, map_location="cpu", weights_only=True))
  module, variables, _ = checkpoint.load_export(workdir)
  ours = module.apply(variables, eval_images, train=False)
  assert max_relative_logit_diff(ours, torch_logits(student.eval(), eval_images)) <= LOGIT_RTOL


# ----------------------------------------------------------------------------------------------
# Vision transformers: timm's DeiT names and RVT's (GPD reference) names.

# Small variants of each family (the full sizes are covered name by name above): a plain and a
# distilled DeiT, and a two-stage RVT (pooling conv, conv-FFN with BatchNorm).
VIT_CASES = {
    "deit_tiny": dict(embed_dim=12, depth=2, num_heads=3, patch_size=4, image_size=16),
    "deit_small": dict(embed_dim=16, depth=1, num_heads=2, patch_size=8, image_size=32, distilled=True),
    "rvt_tiny": dict(base_dims=(4, 4), depths=(2, 1), heads=(2, 4)),
    "rvt_small": dict(base_dims=(6,), depths=(2,), heads=(2,), patch_size=8),
}


def _torch_vit(name, num_classes, seed):
  kwargs = dict(VIT_CASES[name])
  size = kwargs.pop("image_size", 64)
  reference = torch_model(name, num_classes, image_size=size, **kwargs)
  return randomize(reference, seed=seed), size


@pytest.mark.parametrize("name", sorted(VIT_CASES))
def test_transformer_logits_match_pytorch_and_round_trip_is_bitwise(tmp_path, name):
  """A random PyTorch DeiT / RVT with timm's / RVT's module names -> our model: the same logits
  (float32 tolerance), and ours -> PyTorch is bitwise and loads strictly."""
  reference, size = _torch_vit(name, 10, seed=4)
  path = str(tmp_path / f"{name}.pth")
  torch.save(reference.state_dict(), path)
  kwargs = dict(VIT_CASES[name])
  module, variables, info = interop.load_torch_model(
      path, name, sample_shape=None if "image_size" in kwargs else (1, size, size, 3), **kwargs)
  assert info["num_classes"] == 10 and info["input_shape"] == [1, size, size, 3]
  x = images(3, size, seed=1)
  want = torch_logits(reference, x)
  got = module.apply(variables, x, train=False)
  assert max_relative_logit_diff(got, want) <= LOGIT_RTOL
  assert np.std(want) > 1e-3 * np.max(np.abs(want))
  back = interop.to_torch(name, variables)
  original = reference.state_dict()
  assert set(back) == set(original)
  for key, value in original.items():
    if not key.endswith("num_batches_tracked"):
      assert np.array_equal(back[key], value.numpy()), key
  fresh = torch_model(name, 10, image_size=size, **{k: v for k, v in kwargs.items() if k != "image_size"})
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()}, strict=True)
  assert np.array_equal(torch_logits(fresh.eval(), x), want)


def test_transformer_names_and_errors():
  """The qkv Linear maps as one tensor; tokens sit at the top level; a DeiT file read as an RVT, or
  with another depth, is reported with the keys that differ and what the file looks like."""
  module = models.create("deit_tiny", 10)
  rules = interop.torch_rules("deit_tiny", interop.abstract_variables(module, (1, 224, 224, 3)))
  assert rules["blocks.0.attn.qkv.weight"].torch_shape == (576, 192)
  assert rules["cls_token"].path == ("params", "tokens", "cls_token")
  assert rules["pos_embed"].torch_shape == (1, 197, 192)
  state_dict = numpy_state_dict(torch_model("deit_tiny", 1000, image_size=224))
  assert interop.guess_model(state_dict) == "deit_tiny"
  assert interop.num_classes_of(state_dict, "deit_tiny") == 1000
  abstract = interop.abstract_variables(models.create("rvt_tiny", 1000), (1, 224, 224, 3))
  with pytest.raises(interop.StateDictMismatchError,
                     match=r"not a 'rvt_tiny' state_dict as RVT's PoolingTransformer.*missing keys "
                           r"\(patch_embed.proj.0.weight.*looks like a 'deit_tiny'"):
    interop.from_torch("rvt_tiny", state_dict, abstract, source="t.pth")
  shallow = models.create("deit_tiny", 1000, depth=11)
  with pytest.raises(interop.StateDictMismatchError, match=r"unexpected keys \(blocks.11"):
    interop.from_torch("deit_tiny", state_dict, interop.abstract_variables(shallow, (1, 224, 224, 3)),
                       source="t.pth")


def test_vit_teacher_checkpoint_trains(tmp_path):
  """teacher.checkpoint = a PyTorch DeiT file: the run distils from it, and its eval accuracy is the
  PyTorch network's on the same images."""
  import test_vit_train
  from gpd_jax import data
  teacher_kwargs = dict(test_vit_train.TINY_VIT, embed_dim=12)
  reference = randomize(torch_model("deit_tiny", 5, image_size=16,
                                    **{k: v for k, v in teacher_kwargs.items() if k != "image_size"}),
                        seed=9)
  path = str(tmp_path / "deit_teacher.pth")
  torch.save({"model": reference.state_dict()}, path)  # DeiT's release format: {'model': ...}
  config = test_vit_train.tiny_vit_config(steps=2)
  config.teacher.workdir = ""
  config.teacher.checkpoint = path
  config.teacher.model.kwargs = teacher_kwargs
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  batches = list(data.create_eval_iterator(config, "val"))
  correct = sum(float(np.sum(b["mask"] * (np.argmax(torch_logits(reference, b["image"]), -1) == b["label"])))
                for b in batches)
  count = sum(float(np.sum(b["mask"])) for b in batches)
  assert final["eval"]["val"]["top1_T"] == pytest.approx(100.0 * correct / count, abs=1e-6)
  assert final["step"] == 2
