import pytest

from pipeline.baselines import criterion_of
from pipeline.config import CONFIG_DIR, load_config
from core.errors import WorkbenchError


def test_quick_layers_over_default():
    base, quick = load_config(), load_config(CONFIG_DIR / "quick.toml")
    assert base["data"]["eval_utts"] == 500 and quick["data"]["eval_utts"] == 100
    assert quick["criterion"] == base["criterion"]  # the quick run relaxes data, never the criterion


def test_criterion_threshold_absolute_and_relative():
    from tasks.base import Metric

    class Cer:  # the part of a task that criterion_of reads
        name, check_name = "cer", ""

        def metric(self, name):
            return Metric(name, higher_is_better=False)

    cfg = load_config()
    assert criterion_of(cfg, Cer(), 0.05)["threshold"] == pytest.approx(0.053)
    cfg["criterion"].update(kind="relative", delta=0.1)
    assert criterion_of(cfg, Cer(), 0.05)["threshold"] == pytest.approx(0.055)
    cfg["criterion"].update(kind="hackathon")
    with pytest.raises(WorkbenchError, match="reference output check"):
        criterion_of(cfg, Cer(), 0.05)


@pytest.mark.parametrize("text,match", [
    ("[data]\nevel_utts = 3\n", "unknown config key data.'evel_utts'"),
    ("[quantize]\nrecipe = 'tvm'\n", "quantize.recipe"),
    ("[calibration]\nmethods = ['kl']\n", "calibration.methods"),
    ("[data\n", "not valid TOML"),
    ("[calibration]\nmethods = ['qat']\n", "qat.dir is empty"),
    ("[calibration]\nmethods = ['qat']\n[qat]\ndir = '/nonexistent'\n", "not a QAT directory"),
])
def test_bad_configs_are_clear_errors(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(WorkbenchError, match=match):
        load_config(p)
