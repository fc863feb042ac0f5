"""README.md's 'Your own images' walk-through runs as written: its bash block
(train on a folder, export, evaluate) through the console scripts, then its
python block, in a folder holding photos/ (real images, nested, one broken)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env
from image_folders import CROPS, make_photo_folder

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = ("gmvq-train", "gmvq-export", "gmvq-evaluate")


def walkthrough_blocks() -> tuple[str, str]:
    """The bash and python blocks of the section '### Your own images'."""
    section = README.read_text().split("### Your own images\n", 1)[1].split("\n## ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(bash) == 1 and len(python) == 1, "the walk-through is one bash and one python block"
    return bash[0], python[0]


def console_scripts(folder: Path) -> Path:
    """gmvq-train, gmvq-export and gmvq-evaluate as pip installs them (console
    scripts calling gmvq_ext.cli.<command>:command), for the gmvq_ext this test run imports."""
    folder.mkdir()
    for command in COMMANDS:
        script = folder / command
        name = command.split("-", 1)[1]
        script.write_text(f"#!{sys.executable}\nfrom gmvq_ext.cli.{name} import command\ncommand()\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def test_own_images_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    bash, python = walkthrough_blocks()
    work = tmp_path / "work"
    make_photo_folder(work / "photos", crops=48)
    shutil.copy(sorted(CROPS.glob("*.jpg"))[-1], work / "photos" / "beach.jpg")
    scripts = console_scripts(tmp_path / "bin")
    env = subprocess_env(OMP_NUM_THREADS="1", PATH=f"{scripts}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 1 unreadable image(s)" in done.stdout  # the folder's broken file
    assert '"val_psnr"' in done.stdout and '"val_ssim"' in done.stdout  # gmvq-evaluate's output
    assert sorted(p.name for p in (work / "photos-tokenizer").iterdir()) == ["config.json", "model.safetensors"]

    monkeypatch.chdir(work)
    exec(compile(python, str(README), "exec"), {"__name__": "readme_own_images"})
    assert capsys.readouterr().out.strip() == "torch.Size([1, 8, 8]) torch.Size([1, 3, 64, 64])"
