import glob
import os

import pytest

from vecrl import config
from vecrl.config import SpecError


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(config.RUNS_DIR, "*.toml"))))
def test_every_spec_in_runs_loads(path):
    spec = config.load_spec(path)
    assert spec.name == os.path.basename(path)[:-5]
    if spec.agent == "madtd":
        assert spec.madtd.vmax == 150.0 * spec.train.action_repeat
    assert set(spec.to_dict()) == {"name", "tasks", "seeds", "agent", "report_return", "train", spec.agent}
    if spec.name.startswith("madtd-hard"):  # the papers' comparisons lead their reports with the paper's return
        assert spec.report_return == "train"
    if spec.name.startswith(("sac-dyna", "mbpo-dyna", "mbpo-ratio")):
        assert spec.report_return == "eval"


def test_default_spec_is_the_quickstart():
    assert config.load_spec().name == "quickstart"


def test_overrides_parse_toml_literals():
    spec = config.load_spec("quickstart", ["train.steps=20000", "madtd.mpc=true", "madtd.model_actions=random",
                                           "tasks=[\"cartpole-swingup\"]", "seeds=[2, 5]", "madtd.vmax=50"])
    assert spec.train.steps == 20000 and spec.madtd.mpc and spec.madtd.model_actions == "random"
    assert spec.tasks == ("cartpole-swingup",) and spec.seeds == (2, 5) and spec.madtd.vmax == 50.0


def test_fingerprint_changes_with_any_value_that_trains():
    a = config.load_spec("quickstart")
    assert a.fingerprint() == config.load_spec("quickstart").fingerprint()
    assert a.fingerprint() != config.load_spec("quickstart", ["madtd.alpha=0.1"]).fingerprint()
    # Which return a report leads with changes no training: a run can be resumed after changing it.
    assert a.fingerprint() == config.load_spec("quickstart", ['report_return="train"']).fingerprint()
    with pytest.raises(SpecError, match=r"report_return must be one of \('train', 'eval'\)"):
        config.load_spec("quickstart", ['report_return="best"'])


def test_domains_grouping():
    spec = config.load_spec("madtd-hard")
    assert list(spec.domains()) == ["humanoid", "dog"]
    # finger's spin and turn observe different keys: two programs, turn_easy and turn_hard sharing one.
    spec = config.load_spec("quickstart", ['tasks=["finger-turn_hard", "finger-spin", "finger-turn_easy"]'])
    assert spec.domains() == {"finger-turn_easy": ["finger-turn_hard", "finger-turn_easy"], "finger": ["finger-spin"]}


@pytest.mark.parametrize("override,message", [
    ("train.steps", "key=value"), ("bogus=1", "unknown key"), ("madtd.mpc=3", "true or false"),
    ("madtd.model_actions=uniform", "one of"), ("seeds=[1, 1]", "distinct"), ("train=3", "table"),
    ("train.action_repeat=3", "divide"),
])
def test_bad_overrides(override, message):
    with pytest.raises(SpecError, match=message):
        config.load_spec("quickstart", [override])


def test_unknown_spec_name_lists_specs():
    with pytest.raises(SpecError, match="quickstart"):
        config.load_spec("quickstar")
