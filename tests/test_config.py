"""Strict configs: every preset loads, and bad keys and values give one-line errors naming the fix."""
from pathlib import Path

import pytest

from hpc_gan.config import load
from hpc_gan.errors import UserError

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
    (["loss.adv=wasserstein", "train.compile=default"], "the gradient penalty differentiates D's gradient"),
    (["loss.adv=wasserstein", "train.cuda_graphs=true"], "the gradient penalty differentiates D's gradient"),
    (["dist.bucket_cap_mb=0.5", "train.compile=default"], "at least DDP's 1 MB first bucket"),
])
def test_bad_values_are_one_line_errors(override, match):
    with pytest.raises(UserError, match=match) as e:
        load(DEMO, override)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load(bad)


def test_overrides_are_typed():
    cfg = load(DEMO, ["train.g_lr=1e-4", "loss.m_n=0.1", "train.steps=7"])
    assert cfg.train.g_lr == 1e-4 and cfg.loss.m_n == 0.1 and cfg.train.steps == 7


def test_choices_come_from_the_annotations_and_every_dispatch_uses_them():
    import typing

    import torch

    from hpc_gan import config
    from hpc_gan.augment.diffaug import POLICIES
    from hpc_gan.dist.engines import Net, build_net
    from hpc_gan.losses import cond_loss, d_adv_loss, g_adv_loss, has_cond_loss
    from hpc_gan.losses.conditioning import COND_LOSSES
    from hpc_gan.models.heads import ConditioningHead
    from hpc_gan.models.layers import SNLinear
    literal_fields = {f"{s.name}.{k}" for s in __import__("dataclasses").fields(config.Config)
                      for k, h in typing.get_type_hints(typing.get_type_hints(config.Config)[s.name]).items()
                      if typing.get_origin(h) is typing.Literal}
    assert set(config.CHOICES) == literal_fields and "loss.cond" in literal_fields
    assert config.choices("loss.cond") == tuple(config.CONDITIONING)
    assert set(COND_LOSSES) == {m for m in config.CONDITIONING if has_cond_loss(m)} == {"d2d_ce", "2c", "ac", "mh"}
    assert tuple(POLICIES) == config.DIFFAUG_POLICIES
    x, y = torch.randn(4), torch.randn(4)
    for kind in config.choices("loss.adv"):
        assert d_adv_loss(kind, x, y).shape == g_adv_loss(kind, y).shape == ()
    h, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    lc = load(DEMO).loss
    for method in config.choices("loss.cond"):  # every method builds its head and gets a finite loss from it
        head = ConditioningHead(6, 3, method, 5, SNLinear, 1e-6)
        assert torch.isfinite(cond_loss(method, head(h, labels), labels, lc))
    net = torch.nn.Linear(2, 2)
    for strategy in config.choices("dist.strategy"):  # one rank: every strategy is the plain torch engine
        assert isinstance(build_net(net, strategy, 1e-3, (0.0, 0.9), 1e-8, 2, 1, 1, "fp32"), Net)


def test_an_unknown_choice_lists_the_valid_ones():
    with pytest.raises(UserError, match="dist.strategy: 'zero3' is not one of ddp, zero1, zero2"):
        load(DEMO, ["dist.strategy=zero3"])
    with pytest.raises(UserError, match="eval.metrics: unknown metric 'kid'; use a comma list of fid, is, prd, prdc"):
        load(DEMO, ["eval.metrics=fid,kid"])
