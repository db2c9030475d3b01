"""Config files and the config system: every config loads, unknown keys are named, TFDS configs run on mocks."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from mtcl_jax import data
from mtcl_jax.train import config as config_lib
from mtcl_jax.train import train_and_evaluate

from tiny import config_with

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))
DEFAULT = CONFIG_DIR / "default.py"
SHRINK = ["model.stem_width=8", "model.trunk_widths=(16,)", "model.projection_widths=(8,)",
          "model.image_channels=(4,)", "data.batch_size=16", "train.num_steps=2",
          "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2", "eval.probes=()",
          "eval.plots=False", "eval.batch_size=16", "optimizer.warmup_steps=0", "train.async_checkpoints=False"]


def test_the_expected_configs_exist():
  assert {"default.py", "smoke.py", "cifar10_supcon.py", "celeb_a_multiattr.py"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_config_loads_validates_and_documents_its_command(path):
  config = config_lib.load_config(path)
  config_lib.validate_config(config)
  docstring = path.read_text().split('"""')[1]
  assert f"--config experiments/configs/{path.name}" in docstring
  assert "Expected" in docstring
  assert config.is_locked


def test_unknown_override_key_is_named_with_a_suggestion():
  with pytest.raises(ValueError, match=r"unknown config key 'train.num_stepz'; did you mean 'train.num_steps'"):
    config_lib.load_config(DEFAULT, ["train.num_stepz=3"])
  with pytest.raises(ValueError, match="unknown config key 'lr'"):
    config_lib.load_config(DEFAULT, ["lr=3"])


def test_overrides_parse_literals_strings_and_tuples():
  config = config_lib.load_config(DEFAULT, [
      "train.num_steps=7", "contrastive.rule=ntxent", "model.trunk_widths=[8, 4]", "eval.probes=knn",
      "contrastive.clip_tasks=('a', 'b')", "classification.task_weights.digits=2.5", "data.data_dir=/tmp/x"])
  assert config.train.num_steps == 7
  assert config.contrastive.rule == "ntxent"
  assert config.model.trunk_widths == (8, 4)
  assert config.eval.probes == ("knn",)
  assert config.contrastive.clip_tasks == ("a", "b")
  assert config.classification.task_weights.digits == 2.5
  assert config.data.data_dir == "/tmp/x"


def test_overrides_of_open_sections_add_keys_read_as_python_literals():
  config = config_lib.load_config(DEFAULT, [
      "mtl.method=pcgrad", "mtl.options.c=0.4", "mtl.options.rule='mean'", "data.task_batch_sizes.digits=32"])
  assert config.mtl.options.to_dict() == {"c": 0.4, "rule": "mean"}
  assert config.data.task_batch_sizes.digits == 32
  with pytest.raises(ValueError, match="unknown config key 'mtl.options.c.d'"):
    config_lib.load_config(DEFAULT, ["mtl.options.c.d=1"])


def test_bad_override_values_are_named():
  with pytest.raises(ValueError, match="flag --config.train.num_steps=many: invalid literal for int()"):
    config_lib.load_config(DEFAULT, ["train.num_steps=many"])
  with pytest.raises(config_lib.UsageError, match="Missing value for flag --config.train.num_steps"):
    config_lib.load_config(DEFAULT, ["train.num_steps"])


def test_a_typo_in_a_config_file_is_named(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from mtcl_jax.train.config import base_config\n\n"
                  "def get_config():\n  config = base_config()\n  config.train.num_stepss = 3\n  return config\n")
  with pytest.raises(ValueError, match="num_stepss"):
    config_lib.load_config(path)
  with pytest.raises(ValueError, match="does not exist"):
    config_lib.load_config(tmp_path / "missing.py")
  # Loaded after another file, a file without get_config() must not find the other file's.
  config_lib.load_config(CONFIGS[0])
  (tmp_path / "empty.py").write_text("SEED = 0\n")
  with pytest.raises(ValueError, match=r"empty.py' defines no get_config\(\)"):
    config_lib.load_config(tmp_path / "empty.py")
  (tmp_path / "wrong_type.py").write_text(path.read_text().replace("num_stepss = 3", "num_steps = 'many'"))
  with pytest.raises(ValueError, match=r"wrong_type.py': .*'num_steps'"):
    config_lib.load_config(tmp_path / "wrong_type.py")


def test_validation_names_the_bad_value():
  def invalid(key, value, task_names=None):
    return config_lib.validate_config(config_with({key: value}), task_names)

  with pytest.raises(ValueError, match="'contrastive.rule' is 'simclr'"):
    invalid("contrastive.rule", "simclr")
  with pytest.raises(ValueError, match="pretrain_steps"):
    invalid("train.schedule", "two_stage")
  with pytest.raises(ValueError, match=r"unknown tasks \['digitz'\]"):
    invalid("classification.task_weights.digitz", 2.0, task_names=["digits"])
  with pytest.raises(ValueError, match="train.num_steps"):
    invalid("train.num_steps", 0)
  with pytest.raises(ValueError, match=r"'optimizer.name' is 'adam'; expected one of \('adamw', 'sgd', 'lars'\)"):
    invalid("optimizer.name", "adam")
  with pytest.raises(ValueError, match=r"'train.eval_every' must be >= 0 \(0: only at the end\); got -1"):
    invalid("train.eval_every", -1)
  # What config_flags makes of --config.model.trunk_widths=(64,x): a tuple of one string.
  with pytest.raises(ValueError, match=r"'model.trunk_widths' is \('\(64,x\)',\); expected a tuple of int"):
    invalid("model.trunk_widths", ("(64,x)",))
  with pytest.raises(ValueError, match=r"'eval.probes' is \(1,\); expected a tuple of str"):
    invalid("eval.probes", (1,))


@pytest.mark.parametrize("overrides, message", [
    ({"train.num_steps": 20, "optimizer.warmup_steps": 20},
     "config key 'optimizer.warmup_steps' is 20, but its cosine learning-rate schedule spans train.num_steps = 20 "
     "steps and takes a warmup of 0 to 19 steps: lower optimizer.warmup_steps or raise train.num_steps"),
    ({"train.num_steps": 20, "optimizer.warmup_steps": 21, "optimizer.schedule": "constant"},
     "'optimizer.warmup_steps' is 21, but its constant learning-rate schedule spans train.num_steps = 20 steps and "
     "takes a warmup of 0 to 20 steps"),
    ({"train.schedule": "two_stage", "train.num_steps": 20, "train.pretrain_steps": 10, "optimizer.warmup_steps": 10},
     "'optimizer.warmup_steps' is 10, but its cosine learning-rate schedule spans train.pretrain_steps = 10 steps"),
    ({"train.schedule": "two_stage", "train.num_steps": 20, "train.pretrain_steps": 15,
      "head_optimizer.warmup_steps": 5},
     "'head_optimizer.warmup_steps' is 5, but its cosine learning-rate schedule spans train.num_steps - "
     "train.pretrain_steps = 5 steps and takes a warmup of 0 to 4 steps: lower head_optimizer.warmup_steps or raise "
     "train.num_steps"),
    ({"optimizer.warmup_steps": -1}, "'optimizer.warmup_steps' is -1"),
], ids=["joint_cosine", "joint_constant", "pretrain", "heads", "negative"])
def test_a_warmup_longer_than_its_stage_is_named_before_the_run(overrides, message):
  config = config_with(overrides)
  with pytest.raises(ValueError) as raised:
    config_lib.validate_config(config)
  assert message in str(raised.value)


def test_warmups_that_fit_and_intervals_past_the_run_are_valid():
  config_lib.validate_config(config_with({
      "train.num_steps": 20, "optimizer.warmup_steps": 19, "head_optimizer.warmup_steps": 50, "train.log_every": 50,
      "train.eval_every": 250, "train.checkpoint_every": 500}))


# ------------------------------------------------------------------------------------------- TFDS mocks
# TFDS's mock_data patches TFDS's own readers, which mtcl_jax.data does not use (it opens prepared files with
# builder_from_files), and TFDS image features need TensorFlow to encode. So the mocks are real prepared TFDS
# datasets with the standard names and the standard labels, images stored as uint8 tensors, written in
# array_record to a temporary data directory and read through the same path as the real ones. CelebA's mock
# leaves out the landmarks: the data layer takes a TFDS Image feature as the input first, and with the image a
# plain tensor it could pick a landmark instead.


class _MockCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  name = "cifar10"
  VERSION = tfds.core.Version("3.0.2")
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"), features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck")),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(48, 0), "test": self._generate_examples(16, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for index in range(count):
      yield index, {"id": f"{seed}_{index}", "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                    "label": index % 10}


class _MockCelebA(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  name = "celeb_a"
  VERSION = tfds.core.Version("2.1.0")
  code_path = epath.Path(__file__)
  ATTRIBUTES = ("Eyeglasses", "Male", "Smiling")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(24, 20, 3), dtype=np.uint8),
        "attributes": tfds.features.FeaturesDict(
            {name: tfds.features.Scalar(dtype=np.bool_) for name in self.ATTRIBUTES}),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(48, 0), "validation": self._generate_examples(16, 1),
            "test": self._generate_examples(16, 2)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for index in range(count):
      yield index, {"image": rng.integers(0, 256, (24, 20, 3), dtype=np.uint8),
                    "attributes": {name: bool(rng.integers(2)) for name in self.ATTRIBUTES}}


@pytest.mark.slow
@pytest.mark.parametrize("config_name, builder, expected_tasks", [
    ("cifar10_supcon", _MockCifar10, ["cifar10"]),
    ("celeb_a_multiattr", _MockCelebA,
     ["celeb_a/attributes/Eyeglasses", "celeb_a/attributes/Male", "celeb_a/attributes/Smiling"]),
])
def test_tfds_config_runs_on_mock_data(tmp_path, config_name, builder, expected_tasks):
  data_dir = tmp_path / "tfds"
  builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare(file_format="array_record")
  config = config_lib.load_config(CONFIG_DIR / f"{config_name}.py", [*SHRINK, f"data.data_dir={data_dir}"])
  assert config.model.dtype == "bfloat16"  # the accelerator configs' mixed precision runs here too
  result = train_and_evaluate(config, tmp_path / "run")
  assert sorted(result["tasks"]) == expected_tasks
  for scores in result["tasks"].values():
    assert 0 <= scores["accuracy"] <= 100 and 0 <= scores["macro_f1"] <= 100
  assert (tmp_path / "run" / "report.json").exists()
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_tfds_config_without_data_raises_the_data_layers_error(tmp_path):
  config = config_lib.load_config(CONFIG_DIR / "cifar10_supcon.py", [f"data.data_dir={tmp_path}"])
  with pytest.raises(data.DatasetNotPreparedError, match="'cifar10' is not prepared"):
    train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()
