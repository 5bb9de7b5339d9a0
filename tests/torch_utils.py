"""torch / torchvision for the interop tests.

torchvision 0.28 is installed with ``--no-deps`` next to the CPU build of torch 2.13 (the PyPI
wheels are CUDA builds). Its compiled ``_C`` extension is linked against CUDA torch libraries and
fails to load, and ``import torchvision`` then raises "operator torchvision::nms does not exist"
while registering Python fallbacks for ops the extension should have defined. The model code that
the tests use (torchvision.models) is pure Python, so defining the two op schemas that
torchvision's import expects is enough; it is done only when the plain import fails.
"""
import importlib

import torch

_LIBRARY = None  # keeps the op definitions alive


def import_torchvision():
  """``torchvision``, importable on a CPU-only torch."""
  global _LIBRARY
  try:
    return importlib.import_module("torchvision")
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
  _LIBRARY = torch.library.Library("torchvision", "DEF")
  _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  return importlib.import_module("torchvision")


# ----------------------------------------------------------------------------------------------
# PyTorch definitions that torchvision lacks, written from the published model code (same module
# names, so the same state_dict keys): RepDistiller/mdistiller models/resnet.py and models/wrn.py,
# and the GPD reference CNN/models/mobilenet.py.

nn = torch.nn
F = torch.nn.functional


class CifarBasicBlock(nn.Module):
  """conv3x3-BN-ReLU, conv3x3-BN, + shortcut (1×1 conv + BN as 'downsample' when needed), ReLU."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or in_planes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
  """RepDistiller's CIFAR ResNet, depth 6n+2, widths [stem, stage1, stage2, stage3]; AvgPool2d(8)
  (``pool``: input size / 4 in general)."""

  def __init__(self, depth, widths, num_classes, pool=8):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    in_planes = widths[0]
    for i, planes in enumerate(widths[1:]):
      blocks = []
      for j in range(n):
        blocks.append(CifarBasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1))
        in_planes = planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.avgpool = nn.AvgPool2d(pool)
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(self.avgpool(x).flatten(1))


class WideBlock(nn.Module):
  """Pre-activation block; a 1×1 'convShortcut' on the shared BN-ReLU output when widths differ."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.equal = in_planes == planes
    self.convShortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

  def forward(self, x):
    o = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(o))))
    return out + (x if self.equal else self.convShortcut(o))


class NetworkBlock(nn.Module):
  def __init__(self, n, in_planes, planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else planes, planes,
                                           stride if i == 0 else 1) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """RepDistiller's WRN-d-k (dropout 0): conv1, block1..3, bn1-ReLU, avg_pool2d(8), fc."""

  def __init__(self, depth, widen_factor, num_classes, pool=8):
    super().__init__()
    n, k = (depth - 4) // 6, widen_factor
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = NetworkBlock(n, 16, 16 * k, 1)
    self.block2 = NetworkBlock(n, 16 * k, 32 * k, 2)
    self.block3 = NetworkBlock(n, 32 * k, 64 * k, 2)
    self.bn1 = nn.BatchNorm2d(64 * k)
    self.fc = nn.Linear(64 * k, num_classes)
    self.pool = pool

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.avg_pool2d(F.relu(self.bn1(x)), self.pool).flatten(1))


class GpdMobileNet(nn.Module):
  """The GPD reference MobileNetV1: nn.Sequential 'model' of conv_bn + 13 conv_dw + AvgPool2d, fc.

  ``pool``: the AvgPool2d kernel (7 for 224×224 inputs, as published; input/32 in general).
  """
  BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
            (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
            (512, 1024, 2), (1024, 1024, 1))

  def __init__(self, num_classes=1000, pool=7):
    super().__init__()
    layers = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                            nn.ReLU(inplace=True))]
    for inp, oup, stride in self.BLOCKS:
      layers.append(nn.Sequential(
          nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
          nn.ReLU(inplace=True),
          nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)))
    layers.append(nn.AvgPool2d(pool))
    self.model = nn.Sequential(*layers)
    self.fc = nn.Linear(1024, num_classes)

  def forward(self, x):
    return self.fc(self.model(x).flatten(1))


CIFAR_RESNETS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44,
                 "resnet56": 56, "resnet110": 110}
WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


def torch_model(name, num_classes, *, image_size=32, widths=None):
  """The PyTorch counterpart of ``gpd_jax.models.create(name, num_classes)``, in eval mode.

  ``widths``: CIFAR ResNets only, to build a narrow test variant (our ``widths`` kwarg).
  """
  if name in ("resnet18", "resnet34", "resnet50"):
    model = getattr(import_torchvision().models, name)(num_classes=num_classes)
  elif name == "mobilenet_v1":
    model = GpdMobileNet(num_classes, pool=image_size // 32)
  elif name in CIFAR_RESNETS:
    model = CifarResNet(CIFAR_RESNETS[name], widths or (16, 16, 32, 64), num_classes, image_size // 4)
  elif name in ("resnet8x4", "resnet32x4"):
    model = CifarResNet(int(name[6:-2]), widths or (32, 64, 128, 256), num_classes,
                        image_size // 4)
  elif name in WRNS:
    model = WideResNet(*WRNS[name], num_classes, image_size // 4)
  else:
    raise ValueError(name)
  return model.eval()


def randomize(model, seed):
  """Random weights everywhere, with non-trivial BN statistics (and a non-zero counter)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.state_dict().items():
      if name.endswith("num_batches_tracked"):
        p.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
      elif name.endswith("running_var"):
        p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=gen))
      elif name.endswith("running_mean") or name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 1:  # BN weight
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      else:  # conv / linear weight: He-normal keeps activations in range
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
  return model
