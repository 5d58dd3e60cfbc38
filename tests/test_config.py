"""Strict configs: every preset loads, and bad keys and values give one-line errors naming the fix."""
from pathlib import Path

import pytest

from hpc_gan.config import ConfigError, load

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DEMO = CONFIGS[0].parent / "demo.yaml"


def test_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "cifar10_reacgan", "tiny_imagenet_reacgan", "imagenet128_reacgan_b256",
            "imagenet128_reacgan_b2048", "imagenet128_biggan_b2048", "cifar10_acgan"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads(path):
    load(path)


@pytest.mark.parametrize("override,match", [
    (["train.stepz=3"], "unknown key train.stepz; valid keys in train: steps"),
    (["trian.steps=3"], "unknown section 'trian'"),
    (["loss.cond=foo"], "loss.cond: 'foo' is not one of d2d_ce"),
    (["train.steps=abc"], "train.steps: expected int"),
    (["train.steps=0"], "train.steps: must be > 0"),
    (["train.micro_batch=5"], "does not divide train.batch_size"),
    (["loss.diffaug=color,blur"], "unknown policy 'blur'"),
    (["steps=3"], "must look like section.key=value"),
    (["model.arch=biggan_deep"], "biggan_deep is defined at 128 and 256"),
])
def test_bad_values_are_one_line_errors(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load(DEMO, override)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def test_overrides_are_typed():
    cfg = load(DEMO, ["train.g_lr=1e-4", "loss.m_n=0.1", "train.steps=7"])
    assert cfg.train.g_lr == 1e-4 and cfg.loss.m_n == 0.1 and cfg.train.steps == 7
