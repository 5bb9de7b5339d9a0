"""GPD's parameter-tree transforms: pure functions on Flax variable dicts.

* :func:`expand` — IR: student -> function-preserving dynamic teacher (channels ×r, optional branches).
* :func:`student_view` — the training-time student as a differentiable slice of the DT's parameters.
* :func:`export_student` — CBR: DT -> plain deployable student (branches merged).
"""
from gpd_jax.transforms.expand import add_branches, expand, expand_channels
from gpd_jax.transforms.export import export_student, merge_branches
from gpd_jax.transforms.spec import ExpansionSpec, LeafRule, derive_spec, flatten, unflatten
from gpd_jax.transforms.view import student_view

__all__ = ["expand", "expand_channels", "add_branches", "student_view", "export_student",
           "merge_branches", "derive_spec", "ExpansionSpec", "LeafRule", "flatten", "unflatten"]
