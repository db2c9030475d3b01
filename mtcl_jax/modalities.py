"""The modality table: what kinds of input a task may have, one entry each.

An entry says everything the rest of the library asks about a modality: the rank of one example, whether its
items vary in length (and so carry a frame mask), which stem family encodes it and which augmentation makes its
contrastive views. Data validation and padding (:mod:`mtcl_jax.data`), :func:`mtcl_jax.data.augment.make_views`
and the stem choice of :class:`mtcl_jax.models.MultiTaskModel` all read this table, so the allowed names are
written once. A new modality that reuses a stem family and an augmentation is one new entry in ``TABLE``.

Why it sits here, at the top level beside ``similarity`` and ``pairs``, in plain Python: both ``data`` and
``models`` read it, and neither may import the other. For the same reason an entry *names* its stem family (a
key of :data:`mtcl_jax.models.stems.STEMS`) and its augmentation (a key of
:data:`mtcl_jax.data.augment.AUGMENTATIONS`) instead of holding them: holding the augmentation function would
make this module, and so ``models``, import ``mtcl_jax.data`` and with it TensorFlow Datasets; holding the stem
would make ``data`` import flax. Each layer keeps its own implementations in its own table, and a test checks
that every name here has one there.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Modality:
  """One kind of task input.

  Attributes:
    name: the name tasks and configs use, e.g. ``"image"``.
    example_rank: rank of one example: ``3`` for ``[H, W, C]``, ``2`` for ``[T, C]``, ``1`` for ``[D]``.
    frame_mask: items differ in length: they are stored zero-padded with their lengths, and every batch
      carries a ``[B, T]`` bool ``"mask"`` of real frames that the augmentation and the stem receive.
    stem: the stem family that encodes it, a key of :data:`mtcl_jax.models.stems.STEMS`.
    augmentation: the augmentation of its contrastive views, a key of :data:`mtcl_jax.data.augment.AUGMENTATIONS`.
  """

  name: str
  example_rank: int
  frame_mask: bool
  stem: str
  augmentation: str


# Order matters only to for_shape: the first entry of a shape is what an unlabelled TFDS feature becomes.
TABLE: tuple[Modality, ...] = (
    Modality("image", example_rank=3, frame_mask=False, stem="image", augmentation="image"),
    Modality("signal", example_rank=2, frame_mask=False, stem="sequence", augmentation="signal"),
    Modality("sequence", example_rank=2, frame_mask=True, stem="sequence", augmentation="sequence"),
    Modality("tabular", example_rank=1, frame_mask=False, stem="tabular", augmentation="tabular"),
)
NAMES: tuple[str, ...] = tuple(modality.name for modality in TABLE)
_BY_NAME = {modality.name: modality for modality in TABLE}


def get(name: str, *, context: str | None = None) -> Modality:
  """Returns the table entry of modality ``name``.

  Args:
    name: a modality name.
    context: what asked, prefixed to the error (e.g. ``"task 'digits'"``).

  Returns:
    The entry.

  Raises:
    ValueError: one line naming ``name`` and the known modalities.

  Examples:
    >>> get("sequence").frame_mask
    True
  """
  if name not in _BY_NAME:
    prefix = f"{context}: " if context else ""
    raise ValueError(f"{prefix}unknown modality {name!r}; expected one of {NAMES}")
  return _BY_NAME[name]


def for_shape(example_rank: int, *, frame_mask: bool) -> Modality | None:
  """The modality an input of this shape gets when nothing names one (a TFDS feature).

  Args:
    example_rank: rank of one example.
    frame_mask: whether examples vary in length (a variable first axis).

  Returns:
    The first entry of ``TABLE`` with this rank and length kind, or None.

  Examples:
    >>> for_shape(2, frame_mask=False).name
    'signal'
  """
  return next((m for m in TABLE if m.example_rank == example_rank and m.frame_mask == frame_mask), None)
