
import pytest
import yaml

from mmdc.config import Config, config_to_yaml, load_config
from mmdc.errors import ConfigError
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "default.yaml" in names and len(names) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # every shipped config carries its launch command in the header
    assert path.read_text().startswith("#")
    assert "mmdc " in path.read_text().split("\n\n")[0]


def test_default_yaml_is_the_builtin_default():
    shipped = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert shipped == yaml.safe_load(config_to_yaml(Config()))
    assert load_config(None) == Config()


def test_real_model_config_names_llava_pair():
    cfg = load_config(ROOT / "configs" / "llava15_13b_to_7b_scienceqa.yaml")
    assert "13b" in cfg.teacher.path and "7b" in cfg.student.path
    assert cfg.data.format == "scienceqa"


def test_overrides_are_typed():
    cfg = load_config(None, ["eval.batch_size=16", "data.format=scienceqa", "eval.limit=null",
                             "teacher.path=/x/y"])
    assert cfg.eval.batch_size == 16 and cfg.data.format == "scienceqa"
    assert cfg.eval.limit is None and cfg.teacher.path == "/x/y"


def test_unknown_key_names_key_and_allowed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("eval:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "eval.batch_sise" in msg and "batch_size" in msg and str(p) in msg


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(None, ["nope=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"key 'eval.batch_size'.*'many'"):
        load_config(None, ["eval.batch_size=many"])


def test_bad_value_lists_allowed():
    with pytest.raises(ConfigError, match=r"data.format.*'synthetic'.*'scienceqa'"):
        load_config(None, ["data.format=csv"])


def test_out_of_range_value():
    with pytest.raises(ConfigError, match="eval.batch_size"):
        load_config(None, ["eval.batch_size=0"])


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("seed: 1\neval: [unclosed\n  x: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line \d+"):
        load_config(p)


def test_top_level_must_be_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["justakey"])


def test_the_self_improving_teacher_keys_an_earlier_mmdc_wrote_still_load(tmp_path):
    """loop.self_improve and loop.teacher_* moved to the improve section: an old config
    file, an old override and an old run folder's saved config all still mean the same."""
    from mmdc.runstate import changed_keys

    old = tmp_path / "old.yaml"
    old.write_text("loop:\n  self_improve: false\n  teacher_tau: 0.7\n"
                   "  teacher_train:\n    max_steps: 7\n")
    cfg = load_config(old)
    assert not cfg.improve.enabled and cfg.improve.tau == 0.7
    assert cfg.improve.train.max_steps == 7 and cfg.improve.train.learning_rate == 5e-4
    assert load_config(None, ["loop.teacher_seeds=3"]).improve.seeds == 3
    assert load_config(None, ["loop.self_improve=false", "improve.enabled=true"]).improve.enabled
    saved = yaml.safe_load(config_to_yaml(Config()))
    saved["loop"].update(self_improve=saved["improve"].pop("enabled"),
                         teacher_train=saved["improve"].pop("train"))
    assert changed_keys(saved, Config()) == []
    assert changed_keys(saved, load_config(None, ["improve.enabled=false"])) == [
        "improve.enabled"]


def test_the_verification_keys_moved_from_generate_still_load():
    """generate.k, tau, written_vote, verify_prompt, challenge, challenge_by and mastery
    are the verify section's now; generate.temperature, which drove the writing and the
    votes, sets verify.temperature too unless that is given."""
    cfg = load_config(None, ["generate.tau=0.6", "generate.verify_prompt=CQM-LEA",
                             "generate.challenge=false", "generate.temperature=0"])
    assert cfg.verify.tau == 0.6 and cfg.verify.prompt == "CQM-LEA"
    assert not cfg.verify.challenge
    assert cfg.generate.temperature == 0 and cfg.verify.temperature == 0
    cfg = load_config(None, ["generate.temperature=0", "verify.temperature=0.5"])
    assert cfg.verify.temperature == 0.5
