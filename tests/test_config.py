import copy

import pytest
import yaml

from unicom.config import validate_config
from unicom.io import UnicomError

from conftest import REPO


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


def test_defaults_are_filled_into_nested_sections():
    config = validate_config({"data": {"url_list": ["urls.parquet"]}})
    assert config["download"]["allowed_schemes"] == ["http", "https"]
    assert config["embed"]["open_clip"]["model"] == "ViT-B-32"
    assert config["fuse"]["mode"] == "mean"


def test_shipped_configs_validate():
    validate_config(demo_config())
    validate_config(yaml.safe_load((REPO / "config/laion400m.yaml").read_text()))


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("download", "threads", 0, "config key download.threads: 0 is less than the minimum"),
        ("download", "resize_mode", "stretch", "config key download.resize_mode: 'stretch'"),
        ("embed", "encoder", "clip", "config key embed.encoder: 'clip' is not one of"),
        ("demo", "max_images", "many", "config key demo.max_images: 'many' is not of type"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    config = copy.deepcopy(demo_config())
    config[section][key] = value
    with pytest.raises(UnicomError, match=message.replace(".", r"\.")):
        validate_config(config)


def test_nothing_to_do_is_an_error():
    with pytest.raises(UnicomError, match="data.url_list: empty, and demo.enabled is false"):
        validate_config({"demo": {"enabled": False}})
