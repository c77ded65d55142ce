"""A non-editable install carries what the library reads at run time: the default configs (package data)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_install_finds_its_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", "import pipeline.config as c; print(c.__file__); "
                          "print(c.load_config(c.CONFIG_DIR / 'quick.toml')['latency']['iters'])"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(tmp_path / "site")) and out[1] == "5"
