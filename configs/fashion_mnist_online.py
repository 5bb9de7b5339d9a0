"""Several networks in one step, and teacher chains, on Fashion-MNIST (ResNet-8 student).

    python launch/train.py --config=configs/fashion_mnist_online.py:dml --workdir=runs/fm_dml

The argument names the method (default ``dml``; add ``,runlocal`` for a 2-epoch run on 1,024 images):

- ``dml``: Deep Mutual Learning, two ResNet-8 peers from scratch: each CE + KL(sg(other) ‖ self).
- ``dml3``: three peers; each learns from the mean KL towards the two others.
- ``dml_gpd``: DML between two GPD students (each the view of its own ×2 DT, with GPD's own terms).
- ``sokd``: semi-online KD. The frozen ResNet-20 teacher distils into the student (KD) and into a
  trainable copy of itself (the bridge, initialised from the teacher's export) that learns CE + KD(teacher)
  and mutual KL with the student. The paper's bridge is a side branch on the frozen teacher's features;
  ours is a whole trainable copy (same objective, more parameters).
- ``switokd``: an online ResNet-20 teacher and the student learn mutually; the teacher pauses (expert
  mode) while its gap to the student exceeds SwitOKD's adaptive threshold.
- ``bdkd``: an online ResNet-20 teacher (CE + reverse KL towards the student); the student learns
  CE + BD-KD's entropy-gated forward/reverse KL.
- ``camkd``: two frozen teachers (ResNet-20 and ResNet-14), weighted per example by their confidence
  on the label (CA-MKD's logit part).
- ``takd``: the chain ResNet-20 → ResNet-14 assistant → ResNet-8 student, KD at each link; the
  assistant (``:assistant``) is trained first into <workdir>/assistant, itself from <workdir>/assistant/teacher.
- ``born_again=N``: generation N of born-again networks (ResNet-8 → ResNet-8); generation 0 is the
  CE-trained ResNet-8 and each generation is trained first into <workdir>/gen<N-1> when missing.

Chains are consecutive runs: each link is an ordinary workdir, so a cut-off chain resumes where it
stopped. All methods share the Fashion-MNIST recipe of configs/fashion_mnist_gpd.py (5 epochs, SGD
0.05 cosine, clip 5); KD terms use τ 4, CE 0.1 / KD 0.9 like the ``kd`` baseline; online terms T = 1.
"""
import os

from gpd_jax import config_base

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("dml", "dml3", "dml_gpd", "sokd", "switokd", "bdkd", "camkd", "takd", "assistant")


def _teacher_config(model, runlocal):
  return os.path.join(HERE, "fashion_mnist_teacher.py") + ":" + ",".join(
      [model] + (["runlocal"] if runlocal else []))


def _kd(c):
  c.loss.base = "kd"
  c.loss.kd.temperature = 4.0
  c.loss.ce_weight = 0.1
  c.loss.kd_weight = 0.9


def get_config(arg=None):
  flags = set(a for a in (arg or "").split(",") if a)
  runlocal = "runlocal" in flags
  generation = [f for f in flags if f.startswith("born_again=")]
  methods = sorted(flags & set(METHODS))
  unknown = sorted(flags - set(METHODS) - {"runlocal"} - set(generation))
  if not methods and not generation:
    methods = ["dml"]
  if unknown or len(methods) + len(generation) != 1:
    raise ValueError(f"config argument {arg!r}: name one method of {METHODS} or born_again=N "
                     "(optionally with ',runlocal'), e.g. --config=configs/fashion_mnist_online.py:dml")
  c = config_base.fashion_mnist_recipe(config_base.base_config(), num_epochs=5)
  c.model.name = "resnet8"
  c.optim.clip_norm = 5.0
  c.loss.base = "ce"
  method = methods[0] if methods else "born_again"
  suffix = ",runlocal" if runlocal else ""
  peer = config_base.online_peer
  if method == "dml":
    c.online.peers.peer = peer("resnet8")
    c.online.terms = ("ce(peer)", "dml(student<->peer)")
  elif method == "dml3":
    c.online.peers.peer = peer("resnet8")
    c.online.peers.peer2 = peer("resnet8")
    c.online.terms = ("ce(peer)", "ce(peer2)", "dml(student<-peer,peer2)",
                      "dml(peer<-student,peer2)", "dml(peer2<-student,peer)")
  elif method == "dml_gpd":
    config_base.gpd_on(c, ratio=2, branches=False)
    c.online.peers.peer = peer("resnet8", gpd_ratio=2)
    sce = c.gpd.sce_weight
    c.online.terms = ("ce(peer)", "ce(peer_dt)", f"{sce}*sce(peer<-peer_dt)", "dml(student<->peer)")
  elif method == "sokd":
    config_base.static_teacher(c, "resnet20", _teacher_config("resnet20", runlocal))
    _kd(c)
    c.online.peers.bridge = peer("resnet20", init="teacher")
    c.online.terms = ("ce(bridge)", "kd(bridge<-teacher)", "dml(student<->bridge)")
  elif method == "switokd":
    c.online.peers.online_teacher = peer("resnet20")
    c.online.terms = ("ce(online_teacher)", "dml(student<->online_teacher)")
    c.online.switch.teacher = "online_teacher"
  elif method == "bdkd":
    c.online.peers.online_teacher = peer("resnet20")
    c.online.terms = ("ce(online_teacher)", "bdkd(student<-online_teacher)",
                      "reverse_kl(online_teacher<-student)")
  elif method == "camkd":
    config_base.static_teacher(c, "resnet20", _teacher_config("resnet20", runlocal))
    c.online.teachers.teacher_2 = config_base.frozen_teacher(
        "resnet14", "teacher_resnet14", config=_teacher_config("resnet14", runlocal))
    c.online.terms = ("camkd(student<-teacher,teacher_2)",)
  elif method in ("takd", "assistant"):
    _kd(c)
    if method == "assistant":
      c.model.name = "resnet14"
      config_base.static_teacher(c, "resnet20", _teacher_config("resnet20", runlocal))
    else:
      c.teacher.name = "resnet14"
      c.teacher.workdir = "assistant"
      c.teacher.config = os.path.abspath(__file__) + ":assistant" + suffix
  else:  # born_again=N
    try:
      n = int(generation[0].split("=", 1)[1])
    except ValueError:
      n = -1
    if n < 1:
      raise ValueError(f"config argument {arg!r}: born_again=N needs an integer N >= 1")
    _kd(c)
    c.teacher.name = "resnet8"
    c.teacher.workdir = f"gen{n - 1}"
    c.teacher.config = (_teacher_config("resnet8", runlocal) if n == 1 else
                        os.path.abspath(__file__) + f":born_again={n - 1}" + suffix)
  if runlocal:
    config_base.shrink_for_local_run(c)
  return c
