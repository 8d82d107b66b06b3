"""Tests for elm_jax.gin_utils: flags, search paths and error messages."""

import sys

import gin
import pytest

from elm_jax import gin_utils

_MODULE = "ginutils_fixture_mod"

_MODULE_SOURCE = '''
def build_optimizer(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0):
  return {"learning_rate": learning_rate, "warmup_steps": warmup_steps,
          "weight_decay": weight_decay}

def train(model_dir, num_steps=10, optimizer=None):
  return {"model_dir": model_dir, "num_steps": num_steps, "optimizer": optimizer}
'''

_RUN_GIN = f"""
from __gin__ import dynamic_registration
import {_MODULE}

# Required: MODEL_DIR.
MODEL_DIR = %gin.REQUIRED
{_MODULE}.train.model_dir = %MODEL_DIR
{_MODULE}.train.num_steps = 7
{_MODULE}.train.optimizer = @{_MODULE}.build_optimizer()
{_MODULE}.build_optimizer.learning_rate = 1e-4
"""


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def module_dir(tmp_path_factory):
  """A folder holding the configurable module, imported once per session.

  gin rejects registering a second function object under the same name, so the
  module must not be re-imported between tests.
  """
  folder = tmp_path_factory.mktemp("module")
  (folder / f"{_MODULE}.py").write_text(_MODULE_SOURCE)
  sys.path.insert(0, str(folder))
  yield folder
  sys.path.remove(str(folder))


@pytest.fixture
def gin_dir(module_dir, tmp_path, monkeypatch):
  """Gin files under tmp_path/gin: runs/base.gin and experiments/exp.gin."""
  del module_dir  # Only needed on sys.path.
  gin_root = tmp_path / "gin"
  (gin_root / "experiments").mkdir(parents=True)
  (gin_root / "runs").mkdir()
  (gin_root / "runs" / "base.gin").write_text(_RUN_GIN)
  (gin_root / "experiments" / "exp.gin").write_text(
      "include 'runs/base.gin'\n" + f"{_MODULE}.build_optimizer.warmup_steps = 13\n")
  monkeypatch.chdir(tmp_path)
  return gin_root


def _train():
  return gin_utils.configured(sys.modules[_MODULE].train)()


def test_split_gin_bindings_forms():
  bindings, rest = gin_utils.split_gin_bindings(
      ["--x", "1", "--gin.A.b=3", "--gin.MODEL_DIR", "/tmp/m", "pos", "--gin.C.d=@f()"])
  assert rest == ["--x", "1", "pos"]
  assert bindings == ["A.b = 3", "MODEL_DIR = '/tmp/m'", "C.d = @f()"]


def test_format_binding_keeps_literals_and_quoted_strings():
  assert gin_utils.format_binding("a.b", "1e-4") == "a.b = 1e-4"
  assert gin_utils.format_binding("a.b", "True") == "a.b = True"
  assert gin_utils.format_binding("a.b", "'x y'") == "a.b = 'x y'"
  assert gin_utils.format_binding("a.b", "[1, %M]") == "a.b = [1, %M]"
  assert gin_utils.format_binding("a.b", "adamw") == "a.b = 'adamw'"


def test_split_gin_bindings_missing_value():
  with pytest.raises(gin_utils.GinConfigError, match="--gin.A.b has no value"):
    gin_utils.split_gin_bindings(["--gin.A.b"])


def test_search_path_resolves_both_spellings(gin_dir):
  root = gin_dir.parent
  search = [str(gin_dir), str(root)]
  a = gin_utils.resolve_gin_file("experiments/exp.gin", search)
  b = gin_utils.resolve_gin_file("gin/experiments/exp.gin", search)
  assert a == b == str(gin_dir / "experiments" / "exp.gin")


def test_search_path_from_environment(gin_dir, monkeypatch, tmp_path_factory):
  monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
  monkeypatch.setenv(gin_utils.SEARCH_PATH_ENV, str(gin_dir))
  path = gin_utils.resolve_gin_file("runs/base.gin")
  assert path == str(gin_dir / "runs" / "base.gin")


def test_default_search_paths_include_repo_gin():
  assert str(gin_utils.REPO_GIN_DIR) in gin_utils.default_search_paths()


def test_missing_file_lists_nearest(gin_dir):
  with pytest.raises(gin_utils.GinConfigError, match="experiments/exp.gin") as e:
    gin_utils.resolve_gin_file("experiments/exq.gin", [str(gin_dir)])
  assert "Searched:" in str(e.value)


def test_include_and_flags_configure_function(gin_dir):
  gin_utils.parse_gin(["experiments/exp.gin"], ["MODEL_DIR = '/tmp/m'"],
                      search_paths=[str(gin_dir)])
  result = _train()
  assert result["model_dir"] == "/tmp/m"
  assert result["num_steps"] == 7
  assert result["optimizer"]["learning_rate"] == 1e-4
  assert result["optimizer"]["warmup_steps"] == 13


def test_required_macro_names_flag(gin_dir):
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin(["runs/base.gin"], [], search_paths=[str(gin_dir)])
  assert "MODEL_DIR" in str(e.value)
  assert "--gin.MODEL_DIR=VALUE" in str(e.value)


def test_misspelled_configurable_in_file(gin_dir):
  (gin_dir / "bad.gin").write_text(
      f"from __gin__ import dynamic_registration\nimport {_MODULE}\n"
      f"{_MODULE}.trian.num_steps = 3\n")
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin(["bad.gin"], [], search_paths=[str(gin_dir)], finalize=False)
  assert "Nearest names in" in str(e.value)
  assert "train" in str(e.value).split("Nearest names in")[1]


def test_misspelled_configurable_in_flag(gin_dir):
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin(["runs/base.gin"], [f"{_MODULE}.build_optimiser.warmup_steps = 2"],
                        search_paths=[str(gin_dir)])
  assert f"Nearest configurables: {_MODULE}.build_optimizer" in str(e.value)


def test_misspelled_parameter_lists_signature(gin_dir):
  with pytest.raises(gin_utils.GinConfigError) as e:
    gin_utils.parse_gin(["runs/base.gin"], [f"{_MODULE}.build_optimizer.learnin_rate = 2"],
                        search_paths=[str(gin_dir)])
  assert "learnin_rate" in str(e.value)
  assert f"Nearest parameters of {_MODULE}.build_optimizer: learning_rate" in str(e.value)


def test_dynamic_registration_round_trip(gin_dir, tmp_path):
  gin_utils.parse_gin(["experiments/exp.gin"], ["MODEL_DIR = '/tmp/round'"],
                      search_paths=[str(gin_dir)])
  first = _train()
  path = gin_utils.write_config(tmp_path / "model", operative=True)
  written = path.read_text()
  assert f"import {_MODULE}" in written

  gin.clear_config()
  gin_utils.parse_gin([str(path)], [])
  assert _train() == first


def test_write_config_leaves_no_temporary(gin_dir, tmp_path):
  gin_utils.parse_gin(["experiments/exp.gin"], ["MODEL_DIR = 'm'"], search_paths=[str(gin_dir)])
  gin_utils.write_config(tmp_path / "out")
  assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.gin"]


def test_run_reports_config_error(gin_dir, capsys):
  status = gin_utils.run(lambda args: 0, ["--gin_file=runs/base.gin",
                                          f"--gin_search_path={gin_dir}"], "test", prog="t")
  assert status == 2
  assert "--gin.MODEL_DIR=VALUE" in capsys.readouterr().err


def test_run_calls_main_with_flags(gin_dir):
  seen = {}

  def main(args):
    seen["extra"] = args.extra
    seen["train"] = _train()
    return 3

  status = gin_utils.run(
      main, ["--gin_file", "experiments/exp.gin", f"--gin_search_paths=/nonexistent,{gin_dir}",
             "--gin.MODEL_DIR=/tmp/r", f"--gin.{_MODULE}.train.num_steps=11", "--extra=5"],
      "test", add_arguments=lambda p: p.add_argument("--extra", type=int))
  assert status == 3
  assert seen["extra"] == 5
  assert seen["train"]["num_steps"] == 11
  assert seen["train"]["model_dir"] == "/tmp/r"


def test_log_config_writes_text(gin_dir):
  texts = []

  class Recorder:
    """The two methods of clu's MetricWriter that log_config calls."""

    def write_texts(self, step, texts_by_key):
      texts.append((step, dict(texts_by_key)))

    def flush(self):
      pass

  gin_utils.parse_gin(["runs/base.gin"], ["MODEL_DIR = 'd'"], search_paths=[str(gin_dir)])
  gin_utils.log_config(Recorder(), step=0)
  assert texts[0][0] == 0
  assert "MODEL_DIR = 'd'" in texts[0][1]["gin/config"]


def test_shipped_gin_files_resolve():
  shipped = sorted(gin_utils.REPO_GIN_DIR.rglob("*.gin"))
  for path in shipped:
    relative = str(path.relative_to(gin_utils.REPO_GIN_DIR))
    assert gin_utils.resolve_gin_file(relative) == str(path), relative


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
