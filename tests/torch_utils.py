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


# ----------------------------------------------------------------------------------------------
# Vision transformers, written from the published definitions with their module names: timm's
# VisionTransformer as DeiT uses it (timm/models/vision_transformer.py, deit.py) and RVT's
# PoolingTransformer (GPD's RVT/robust_models.py). Eval mode only (no dropout / drop-path).


class TimmAttention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5
    return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class TimmMlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
  def __init__(self, dim, num_heads, mlp):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = TimmAttention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = mlp

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TimmVisionTransformer(nn.Module):
  """timm's ViT / DeiT: class token (+ distillation token), learned positions, pre-LN blocks."""

  def __init__(self, num_classes, *, image_size=224, patch_size=16, embed_dim=192, depth=12,
               num_heads=3, mlp_ratio=4.0, distilled=False):
    super().__init__()
    tokens = 2 if distilled else 1
    self.distilled = distilled
    self.patch_embed = TimmPatchEmbed(patch_size, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    if distilled:
      self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + tokens, embed_dim))
    self.blocks = nn.ModuleList([TimmBlock(embed_dim, num_heads,
                                           TimmMlp(embed_dim, int(embed_dim * mlp_ratio)))
                                 for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)
    if distilled:
      self.head_dist = nn.Linear(embed_dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    lead = [self.cls_token] + ([self.dist_token] if self.distilled else [])
    x = torch.cat([t.expand(x.shape[0], -1, -1) for t in lead] + [x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    if not self.distilled:
      return self.head(x[:, 0])
    return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2  # DeiT's eval output


class RvtConvMlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.bn1 = nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden)
    self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
    self.bn2, self.act = nn.BatchNorm2d(hidden), nn.GELU()
    self.fc2, self.bn3 = nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim)

  def forward(self, x):
    b, n, c = x.shape
    side = int(n ** 0.5)
    x = x.reshape(b, side, side, c).permute(0, 3, 1, 2)
    x = self.act(self.bn1(self.fc1(x)))
    x = self.act(self.bn2(self.dwconv(x)))
    x = self.bn3(self.fc2(x))
    return x.permute(0, 2, 3, 1).reshape(b, -1, c)


class RvtTransformer(nn.Module):
  def __init__(self, dim, depth, heads, mlp_ratio):
    super().__init__()
    self.blocks = nn.ModuleList([TimmBlock(dim, heads, RvtConvMlp(dim, int(dim * mlp_ratio)))
                                 for _ in range(depth)])

  def forward(self, x):
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    for block in self.blocks:
      x = block(x)
    return x.transpose(1, 2).reshape(b, c, h, w)


class RvtPooling(nn.Module):
  def __init__(self, in_dim, out_dim):
    super().__init__()
    self.conv = nn.Conv2d(in_dim, out_dim, 3, padding=1, stride=2, groups=in_dim)

  def forward(self, x):
    return self.conv(x)


class RvtEmbedding(nn.Module):
  def __init__(self, out_dim, patch_size):
    super().__init__()
    k = patch_size // 4
    self.proj = nn.Sequential(nn.Conv2d(3, 32, 7, stride=2, padding=2), nn.BatchNorm2d(32),
                              nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(32, out_dim, k, stride=k))

  def forward(self, x):
    return self.proj(x)


class RvtPoolingTransformer(nn.Module):
  """RVT: conv stem, per stage pre-LN blocks with a conv-FFN, grouped pooling convs, GAP, LN, head."""

  def __init__(self, num_classes, *, base_dims=(32, 32), depths=(10, 2), heads=(6, 12),
               mlp_ratio=4.0, patch_size=16):
    super().__init__()
    dims = [d * h for d, h in zip(base_dims, heads)]
    self.patch_embed = RvtEmbedding(dims[0], patch_size)
    self.transformers = nn.ModuleList([RvtTransformer(d, n, h, mlp_ratio)
                                       for d, n, h in zip(dims, depths, heads)])
    self.pools = nn.ModuleList([RvtPooling(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
    self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
    self.head = nn.Linear(dims[-1], num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    for stage, transformer in enumerate(self.transformers):
      x = transformer(x)
      if stage < len(self.pools):
        x = self.pools[stage](x)
    return self.head(self.norm(x.mean(dim=(2, 3))))


VITS = {"deit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
        "deit_small": dict(embed_dim=384, depth=12, num_heads=6)}
RVTS = {"rvt_tiny": dict(base_dims=(32, 32), depths=(10, 2), heads=(6, 12)),
        "rvt_small": dict(base_dims=(64,), depths=(12,), heads=(6,))}


CIFAR_RESNETS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44,
                 "resnet56": 56, "resnet110": 110}
WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


def torch_model(name, num_classes, *, image_size=32, widths=None, **kwargs):
  """The PyTorch counterpart of ``gpd_jax.models.create(name, num_classes)``, in eval mode.

  ``widths``: CIFAR ResNets only, to build a narrow test variant (our ``widths`` kwarg).
  ``kwargs``: the transformers' size overrides (our model kwargs: embed_dim, depth, ...).
  """
  if name in VITS:
    model = TimmVisionTransformer(num_classes, image_size=image_size, **{**VITS[name], **kwargs})
  elif name in RVTS:
    model = RvtPoolingTransformer(num_classes, **{**RVTS[name], **kwargs})
  elif name in ("resnet18", "resnet34", "resnet50"):
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
