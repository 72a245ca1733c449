"""Registry behaviour and the `zoo` command line (list, info, predict)."""

from __future__ import annotations

import pytest

import zoo
import zoo_cli as cli
from zoo import registry
from zoo.config import ModelCfg

from architectures import families


def test_unknown_name_suggests_close_matches():
    with pytest.raises(zoo.UnknownModelError, match="Did you mean: mobilenetv3_large_100"):
        zoo.create_model("mobilenetv3_large_10")
    with pytest.raises(zoo.UnknownModelError, match="no pretrained tag 'nope'"):
        zoo.load("mobilenetv3_large_100.nope")


def test_duplicate_names_and_unknown_kwargs_raise():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model(ModelCfg(name="mobilenetv2_100", family="x"))(lambda **kw: None)
    with pytest.raises(TypeError, match="create_model\\('mobilenetv2_100'\\).*widht"):
        zoo.create_model("mobilenetv2_100", widht=2)


def test_list_models_patterns_and_tags():
    assert "mobilevit_xxs" in zoo.list_models("mobilevit*")
    tags = zoo.list_models("tf_efficientnet_lite0*", pretrained=True)
    assert tags[0] == "tf_efficientnet_lite0.in1k_pkg" and "tf_efficientnet_lite0.in1k" in tags


def test_list_models_by_task():
    classifiers = zoo.list_models(task="classification")
    assert "mobilenetv2_100" in classifiers and set(classifiers) <= set(zoo.list_models())
    for task in ("segmentation", "detection"):
        assert not set(zoo.list_models(task=task)) & set(classifiers)
    with pytest.raises(ValueError, match="unknown task 'segmentaton'.*segmentation"):
        zoo.list_models(task="segmentaton")
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        registry.register_model(ModelCfg(name="depth_net", family="x", task="depth"))(lambda **kw: None)


def test_model_info_reports_counts_and_accuracy():
    info = zoo.model_info("mobilenetv3_large_100")
    assert info["params"] == 5_483_032 and info["macs"] == 216_589_760
    assert info["pretrained"][0]["tag"] == "ra_in1k" and info["pretrained"][0]["top1"] == pytest.approx(75.784)


def test_cli_list_and_info(capsys):
    assert cli.main(["list", "mobilenetv3_small*"]) == 0
    assert capsys.readouterr().out.split() == ["mobilenetv3_small_050", "mobilenetv3_small_075",
                                               "mobilenetv3_small_100"]
    assert cli.main(["info", "mobilevit_xxs"]) == 0
    out = capsys.readouterr().out
    assert "1,272,024" in out and "top-1 68.94" in out and "256x256" in out
    assert out.startswith("mobilevit_xxs  (mobilevit;")  # a classifier's task goes unsaid
    assert cli.main(["info", "ssdlite320_mobilenet_v3_large"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ssdlite320_mobilenet_v3_large  (detection; ssdlite;") and "3,440,060" in out


@pytest.mark.parametrize("family", sorted(families()))
def test_cli_info_of_every_family(family, capsys):
    """Every family's record prints, whatever its sources publish (LeViT and MobileOne give top-1 only)."""
    name = families()[family][0]
    assert cli.main(["info", name]) == 0
    out = capsys.readouterr().out
    assert f"{zoo.model_info(name)['params']:,}" in out and "train form" in out and "deploy form" in out
    assert "top-1" in out or "accuracy n/a" in out or "pretrained  none" in out


def test_cli_unknown_model_is_one_line_error(capsys):
    assert cli.main(["info", "mobilenet_v4"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'mobilenet_v4'" in err and "Did you mean" in err


@pytest.mark.slow
def test_cli_predict_offline_top5(capsys, offline_cache):
    from pathlib import Path

    photo = Path(__file__).resolve().parents[1] / "examples" / "chelsea.jpg"
    assert cli.main(["predict", "--model", "tf_efficientnet_lite0", "--quiet", str(photo)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "tf_efficientnet_lite0.in1k_pkg" in lines[0] and len(lines) == 6
    assert any(cat in lines[1] for cat in ("tiger cat", "Egyptian cat", "tabby"))


def test_unknown_tag_lists_the_model_tags_and_the_family_weights():
    with pytest.raises(zoo.UnknownModelError) as err:
        registry.get_entry("mnasnet_100").pretrained_cfg("nope")
    message = str(err.value)
    assert "no pretrained tag 'nope'; its tags: rmsp_in1k" in message
    assert "(mnasnet): " in message and "mnasnet0_5.imagenet1k_v1" in message and "semnasnet_100.rmsp_in1k" in message
