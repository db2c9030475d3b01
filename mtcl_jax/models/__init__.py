"""flax.linen models: modality stems, the sharing architectures (one trunk, cross-stitch, MMoE, CGC, PLE,
DSelect-k), the projection head and per-task heads."""

from mtcl_jax import _extras

with _extras.requires("train", "mtcl_jax.models"):
  from mtcl_jax.modalities import NAMES as MODALITIES  # noqa: F401 (the modality names, re-exported)
  from mtcl_jax.models.architectures import ARCHITECTURES as ARCHITECTURES
  from mtcl_jax.models.architectures import ArchitectureOptions as ArchitectureOptions
  from mtcl_jax.models.multitask import MLP as MLP
  from mtcl_jax.models.multitask import MultiTaskModel as MultiTaskModel
  from mtcl_jax.models.multitask import TaskInfo as TaskInfo
  from mtcl_jax.models.stems import STEMS as STEMS
  from mtcl_jax.models.stems import ImageStem as ImageStem
  from mtcl_jax.models.stems import SequenceStem as SequenceStem
  from mtcl_jax.models.stems import StemFamily as StemFamily
  from mtcl_jax.models.stems import TabularStem as TabularStem
