"""`wb search` on a model we did not write, through the Task interface: a small transformer classifier exported
in the test, its feeds as .npz, the generic `onnx` task with a built-in fidelity metric; a user entry-point task
and a user metric; and the bad inputs that must fail before any expensive work."""
import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from workbench.cli import main

DIM, CLASSES = 32, 5


class Block(nn.Module):
    """Pre-LN self-attention + FFN, written out so that the export is plain MatMul/Softmax/LayerNorm."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / DIM ** 0.5, dim=-1)
        x = x + self.o(att @ self.v(h))
        return x + self.ff2(torch.relu(self.ff1(self.ln2(x))))


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, DIM)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, features):
        return self.head(self.blocks(self.inp(features)).mean(dim=1))


def write_feeds(directory, n, seed):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.savez(directory / f"{i:03d}.npz", features=rng.normal(size=(2, 12, 16)).astype(np.float32))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    torch.manual_seed(0)
    torch.onnx.export(Classifier().eval(), (torch.randn(2, 12, 16),), str(d / "classifier.onnx"),
                      input_names=["features"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"features": {0: "B", 1: "T"}, "logits": {0: "B"}})
    write_feeds(d / "calib", 4, 0)
    write_feeds(d / "eval", 3, 1)
    return d


CONFIG = """
[task]
kind = "onnx"
{extra}
[[task.graphs]]
name = "classifier"
path = "classifier.onnx"
calib_data = "calib"
eval_data = "eval"

[criterion]
metric = "{metric}"
kind = "fixed"
delta = {delta}

[backend]
name = "onnxruntime"
threads = 1

[calibration]
methods = ["max", "percentile"]

[latency]
warmup = 1
iters = 3
search_warmup = 0
search_iters = 2

[budget]
max_full_evals = 6
"""


def write_config(d, name, metric="cosine", delta=0.9, extra=""):
    path = d / name
    path.write_text(CONFIG.format(metric=metric, delta=delta, extra=extra))
    return path


def test_search_quick_on_a_generic_onnx_model(project, capsys):
    d = project
    cfg = write_config(d, "generic.toml")
    runs = d / "runs"
    assert main(["search", "--quick", "--config", str(cfg), "--runs-root", str(runs), "--run-dir",
                 str(runs / "r1"), "--out", str(d / "out")]) == 0
    out = capsys.readouterr().out
    run = json.loads((runs / "r1" / "run.json").read_text())
    assert run["status"] == "passed" and run["task"]["graphs"] == ["classifier"]
    assert run["criterion"]["higher_is_better"] and run["criterion"]["threshold"] == 0.9
    labels = [b["label"] for b in run["baselines"]]
    assert labels[:2] == ["FP32", "FP16"] and {"INT8 all (max)", "INT8 all (percentile_99.99)"} <= set(labels)
    by_label = {b["label"]: b for b in run["baselines"]}
    # one graph (the same all-INT8 plan, only the scales differ): timed once, for both calibrators
    first, second = by_label["INT8 all (max)"]["latency"], by_label["INT8 all (percentile_99.99)"]["latency"]
    assert "timed_as" not in first and second["timed_as"] == "INT8 all (max)"
    assert second["objective_ms"] == first["objective_ms"] and second["cases"] == first["cases"]
    assert "timed once, for all of them" in (runs / "r1" / "report.md").read_text()
    assert set(run["stage_s"]) >= {"calibration", "baselines", "sensitivity", "search", "final engines"}
    fp32 = run["baselines"][0]["accuracy"]
    assert fp32["cosine"] == pytest.approx(1.0) and fp32["top1"] == 1.0 and fp32["max_abs"] == 0.0
    sel = run["selected"]
    assert sel["accuracy"]["cosine"] >= 0.9 and sel["latency"]["objective_ms"] > 0
    assert all(k.startswith("classifier:") for k in run["sensitivity"])
    assert (d / "out" / "classifier.onnx").is_file() and (d / "out" / "classifier.plan.json").is_file()
    md = (runs / "r1" / "report.md").read_text()
    assert "higher is better" in md and "cosine" in md
    assert "PASSED" in out or "passed" in out.lower()
    from report.index import list_runs
    assert [r["model"] for r in list_runs(runs)] == ["onnx"]


def test_extra_recipe_baselines_are_their_own_graphs(project):
    """quantize.extra_recipes: all-INT8 baselines of a second recipe join the run, under their own labels and
    files, and the selection never takes them for the run recipe's graph of the same plan."""
    d = project
    cfg = write_config(d, "recipes.toml", extra="") .read_text() + '[quantize]\nrecipe = "onnxruntime"\n' \
        'extra_recipes = ["tensorrt", "onnxruntime"]\n'
    (d / "recipes.toml").write_text(cfg)
    runs = d / "runs"
    assert main(["search", "--quick", "--config", str(d / "recipes.toml"), "--runs-root", str(runs), "--run-dir",
                 str(runs / "r-recipes")]) == 0
    run = json.loads((runs / "r-recipes" / "run.json").read_text())
    assert run["config"]["quantize"]["extra_recipes"] == ["tensorrt"]  # the run's own recipe is not repeated
    by_label = {b["label"]: b for b in run["baselines"]}
    trt = by_label["INT8 all (max, tensorrt recipe)"]
    assert trt["recipe"] == "tensorrt" and "recipe" not in by_label["INT8 all (max)"]
    models = json.loads((runs / "r-recipes" / "models.json").read_text())
    assert models["INT8 all (max, tensorrt recipe)"] != models["INT8 all (max)"]
    rows = {r["label"]: r for r in run["side_by_side"]["rows"]}
    for label, row in rows.items():  # same plan, other recipe: another graph, never merged into one option
        assert all(("tensorrt recipe" in m) == ("tensorrt recipe" in label) for m in row["same_plan"]), (label, row)
    if "tensorrt recipe" in run["selected"]["source"]:
        assert run["selected"]["recipe"] == "tensorrt"


USER_MODULE = '''
import numpy as np
from tasks.base import Metric
from tasks.onnx_task import OnnxTask
from tasks.base import GraphSpec


def agreement(reference, candidate):
    """A user metric: mean squared error of the logits (and NaN on request)."""
    ref = np.concatenate([o["logits"] for o in reference["classifier"]])
    got = np.concatenate([o["logits"] for o in candidate["classifier"]])
    return {{"neg_mse": -float(np.mean((ref - got) ** 2))}}


def nan_metric(reference, candidate):
    return float("nan")


class MyTask(OnnxTask):
    name = "my-classifier"


def make_task(options):
    root = options["root"]
    return MyTask([GraphSpec("classifier", root + "/classifier.onnx")],
                  {{"classifier": {{"calib": root + "/calib", "eval": root + "/eval", "latency": None}}}},
                  metric="user_tasks_mod:agreement")


def not_a_task(options):
    return 42
'''


@pytest.fixture
def user_module(project, monkeypatch):
    (project / "user_tasks_mod.py").write_text(textwrap.dedent(USER_MODULE.format()))
    monkeypatch.syspath_prepend(str(project))
    return project


def test_user_entry_task_and_user_metric(user_module, capsys):
    d = user_module
    cfg = d / "entry.toml"
    cfg.write_text(CONFIG.format(metric="neg_mse", delta=-0.05, extra=f'entry = "user_tasks_mod:make_task"\n'
                                 f'options = {{ root = "{d}" }}').replace(
        '[[task.graphs]]\nname = "classifier"\npath = "classifier.onnx"\ncalib_data = "calib"\neval_data = "eval"\n', ""))
    runs = d / "runs-entry"
    assert main(["search", "--config", str(cfg), "--runs-root", str(runs), "--run-dir", str(runs / "e1")]) == 0
    run = json.loads((runs / "e1" / "run.json").read_text())
    assert run["model"] == "my-classifier" and "neg_mse" in run["task"]["metrics"]
    assert run["baselines"][0]["accuracy"]["neg_mse"] == 0.0 and run["status"] == "passed"


@pytest.mark.parametrize("extra, message", [
    ('entry = "no_such_module_xyz:make"', "cannot import 'no_such_module_xyz'"),
    ('entry = "user_tasks_mod:missing"', "has no callable 'missing'"),
    ('entry = "user_tasks_mod:not_a_task"', "returned int, not a tasks.base.Task"),
    ('entry = "user_tasks_mod"', "must be 'module:callable'"),
    ('metric = "user_tasks_mod:nan_metric"', "is NaN"),
])
def test_bad_tasks_fail_before_any_work(user_module, tmp_path, capsys, extra, message):
    cfg = write_config(user_module, "bad.toml", extra=extra)
    run_dir = tmp_path / "run"
    assert main(["search", "--config", str(cfg), "--runs-root", str(tmp_path), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not run_dir.exists()


def test_bad_feeds_and_graph_fail_before_any_work(project, tmp_path, capsys):
    bad = tmp_path / "bad_eval"
    bad.mkdir()
    np.savez(bad / "0.npz", features=np.zeros((2, 12, 16), np.float64))
    cfg = write_config(project, "badfeeds.toml")
    cfg.write_text(cfg.read_text().replace('eval_data = "eval"', f'eval_data = "{bad}"'))
    assert main(["search", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    assert "is float64, the model takes float32" in capsys.readouterr().err
    cfg.write_text(cfg.read_text().replace('path = "classifier.onnx"', 'path = "nope.onnx"'))
    assert main(["search", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg = write_config(project, "badmetric.toml", metric="cer_rescore")
    assert main(["search", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    assert "has no metric 'cer_rescore'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_readme_user_task_example_runs(tmp_path, monkeypatch, capsys):
    """The README's user-task example, taken from the README itself, through `wb search`."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("# mypkg/tasks.py\n", 1)[1].split("```", 1)[0]
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1)).eval()
    torch.onnx.export(net, (torch.randn(8, 1, 16, 16),), str(tmp_path / "net.onnx"), input_names=["input"],
                      output_names=["output"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "B"}, "output": {0: "B"}})
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1, (64, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():  # "clean" targets the FP32 net reaches, so that PSNR is finite and high
        target = net(torch.from_numpy(clean)).numpy()
    np.savez(tmp_path / "data.npz", noisy=clean, clean=target + 0.01)
    cfg = tmp_path / "user.toml"
    cfg.write_text(f'[task]\nentry = "mypkg.tasks:make_task"\noptions = {{ onnx = "{tmp_path / "net.onnx"}", '
                   f'data = "{tmp_path / "data.npz"}" }}\n[criterion]\nmetric = "psnr"\nkind = "absolute"\n'
                   f'delta = 3.0\n[backend]\nname = "onnxruntime"\nthreads = 1\n[calibration]\nmethods = ["max"]\n'
                   f'[latency]\nwarmup = 1\niters = 2\nsearch_warmup = 0\nsearch_iters = 1\n')
    assert main(["search", "--config", str(cfg), "--runs-root", str(tmp_path / "runs"),
                 "--run-dir", str(tmp_path / "runs" / "u1")]) == 0
    run = json.loads((tmp_path / "runs" / "u1" / "run.json").read_text())
    assert run["model"] == "denoiser" and run["status"] == "passed"
    assert run["baselines"][0]["accuracy"]["psnr"] > 30


def test_wb_build_any_model_with_shapes(project, tmp_path, capsys):
    """`wb build` on a model that is not WeNet's: default shapes are refused with a pointer to --shapes, and a
    --shapes file builds it."""
    model = project / "classifier.onnx"
    assert main(["build", "--model", str(model), "--backend", "onnxruntime", "--out", str(tmp_path / "e0")]) == 2
    assert "--shapes" in capsys.readouterr().err and not (tmp_path / "e0").exists()
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"features": {"min": [1, 4, 16], "opt": [2, 12, 16], "max": [8, 64, 16]}}))
    assert main(["build", "--model", str(model), "--backend", "onnxruntime", "--shapes", str(shapes),
                 "--out", str(tmp_path / "e1"), "--threads", "1"]) == 0
    meta = json.loads((tmp_path / "e1" / "engine.json").read_text())
    assert meta["kind"] == "generic" and meta["shapes"]["features"]["max"] == [8, 64, 16]


def test_named_evaluation_sets_confirmation_and_criterion_modes_end_to_end(project, capsys):
    """The generic task with eval_data as named sets and a confirm_data set, through `wb search`: the weighted
    criterion judges the sets' weighted mean, the bound mode the interval's low end (cosine: higher is better),
    and the confirmation set is measured for the baselines and the selected mix."""
    d = project
    write_feeds(d / "eval_b", 3, 2)
    write_feeds(d / "conf", 3, 3)
    base = write_config(d, "sets.toml", delta=0.95).read_text().replace(
        'eval_data = "eval"', 'eval_data = { a = "eval", b = "eval_b" }\nconfirm_data = "conf"')
    runs = d / "runs-sets"
    results = {}
    for name, crit in (("weighted", 'sets = "weighted"\nweights = { a = 3, b = 1 }\n'), ("bound", 'mode = "bound"\n')):
        cfg = d / f"sets-{name}.toml"
        cfg.write_text(base.replace("[criterion]\n", "[criterion]\n" + crit))
        assert main(["search", "--quick", "--config", str(cfg), "--runs-root", str(runs), "--run-dir",
                     str(runs / name)]) == 0, capsys.readouterr().err
        results[name] = json.loads((runs / name / "run.json").read_text())
        out = capsys.readouterr().out  # the summary names the thresholds the rule judges
        assert ("(weighted mean)" if name == "weighted" else "thresholds a 0.95, b 0.95") in out, out
    for name, run in results.items():
        assert run["task"]["eval_sets"] == ["a", "b"] and run["task"]["confirm_set"] == "confirm"
        fp32 = run["baselines"][0]
        assert set(fp32["accuracy"]["sets"]) == {"a", "b"} and fp32["accuracy"]["sets"]["a"]["cosine"] == pytest.approx(1.0)
        assert fp32["confirmation"]["set"] == "confirm"
        assert fp32["confirmation"]["accuracy"]["cosine"] == pytest.approx(1.0)
        assert run["confirmation"]["attempts"] and run["selected"]["confirmation"]["set"] == "confirm"
        for b in run["baselines"][1:]:
            if "accuracy" not in b:
                continue
            sets, ivs = b["accuracy"]["sets"], b["accuracy"]["intervals"]
            assert set(ivs) == {"all", "a", "b"} and all(iv["metric"] == "cosine" for iv in ivs.values())
            assert ivs["a"]["n_items"] == 3 * 2  # 3 feeds of batch 2: one item per row
            assert ivs["a"]["delta"] == pytest.approx(sets["a"]["cosine"] - fp32["accuracy"]["sets"]["a"]["cosine"])
            if name == "weighted":
                assert set(b["verdicts"]) == {"weighted"}
                mean = (3 * sets["a"]["cosine"] + sets["b"]["cosine"]) / 4
                assert b["verdicts"]["weighted"] == (mean >= 0.95)
            else:
                assert set(b["verdicts"]) == {"a", "b"}
                for s in ("a", "b"):  # FP32's value plus the low end of the change's interval
                    ref = fp32["accuracy"]["sets"][s]["cosine"]
                    assert b["verdicts"][s] == (ref + ivs[s]["low"] >= 0.95)
                    assert ivs[s]["low"] <= ivs[s]["delta"]
    assert "weighted" in results["weighted"]["criterion"]["text"]
    assert "bound" in results["bound"]["criterion"]["text"]
    md = (runs / "bound" / "report.md").read_text()
    assert "| a |" in md and "| b |" in md and "confirm" in md


@pytest.mark.parametrize("eval_data, message", [
    ('{ }', "a table of set names"),
    ('{ all = "eval" }', "not named 'all'"),
    ('{ a = 3 }', "a table of set names"),
])
def test_bad_evaluation_sets_are_one_line_errors(project, tmp_path, capsys, eval_data, message):
    cfg = write_config(project, "badsets.toml")
    cfg.write_text(cfg.read_text().replace('eval_data = "eval"', f"eval_data = {eval_data}"))
    assert main(["search", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_runs_prune_frees_caches_and_keeps_results(project, capsys):
    """`wb runs prune`: a finished run loses engines/ and the placed models models.json does not name; its
    results, report, final/ and the named models stay, and the report can be written again from them."""
    d = project
    runs = d / "runs-prune"
    cfg = write_config(d, "prune.toml", metric="snr_db", delta=44.0)  # all-INT8 fails: the search places more
    assert main(["search", "--quick", "--config", str(cfg), "--runs-root", str(runs),
                 "--run-dir", str(runs / "p")]) == 0
    run_dir = runs / "p"
    named = [run_dir / p for m in json.loads((run_dir / "models.json").read_text()).values() for p in m.values()]
    placed = list((run_dir / "models" / "classifier").glob("*.onnx"))
    assert (run_dir / "engines").is_dir() and len(placed) > len([p for p in named if "models/classifier" in str(p)])
    capsys.readouterr()
    assert main(["runs", "prune", "--dry-run", str(run_dir)]) == 0
    assert "would free" in capsys.readouterr().out and (run_dir / "engines").is_dir()
    assert main(["runs", "prune", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "freed" in out and float(out.split("freed ")[1].split(" GB")[0]) >= 0
    assert not (run_dir / "engines").exists() and all(p.is_file() for p in named)
    left = list((run_dir / "models" / "classifier").glob("*.onnx"))
    assert {p.resolve() for p in left} == {p.resolve() for p in named if "models/classifier" in str(p)}
    assert (run_dir / "final" / "classifier.onnx").is_file() and (run_dir / "run.json").is_file()
    assert main(["runs", "report", str(run_dir), "--root", str(runs)]) == 0
    assert main(["runs", "prune", str(d)]) == 2  # not a run directory: one line, nothing deleted
    assert "holds no finished run" in capsys.readouterr().err
