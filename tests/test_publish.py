"""Publishing to a Hugging Face Space, as far as it can be checked offline: what is uploaded, through
which calls, and that those files alone serve the app."""
import shutil
import subprocess
import sys

import pytest

from digit_demo.publish import SPACE_FILES, publish, space_files

from .conftest import ROOT


def test_the_space_gets_the_app_the_library_and_the_checkpoints_and_nothing_else():
    files = space_files(ROOT)
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "digit_demo").glob("*.py"))
    weights = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "checkpoints").glob("*.safetensors"))
    assert {"README.md", "app.py", "requirements.txt", "checkpoints/sweeps.json"} <= set(files)
    assert set(modules) <= set(files) and set(weights) <= set(files) and weights
    assert not [f for f in files if f.startswith(("tests/", "train/", ".venv/", "out/", "runs/")) or "__pycache__" in f]
    # the README's front matter is the Space's configuration
    front = (ROOT / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front


class RecordingHub:
    """Stands in for ``huggingface_hub.HfApi`` (no network here): records the calls it gets."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/spaces/{kw['repo_id']}/commit/abc"})()


def test_publish_creates_a_gradio_space_and_uploads_in_one_commit(tmp_path):
    hub = RecordingHub()
    url = publish("me/house-numbers", ROOT, api=hub)
    assert url == "https://huggingface.co/spaces/me/house-numbers/commit/abc"
    (create, repo, kw), (upload, repo2, up) = hub.calls
    assert (create, repo, kw["repo_type"], kw["space_sdk"], kw["exist_ok"]) == ("create_repo", "me/house-numbers", "space", "gradio", True)
    assert (upload, repo2, up["repo_type"], up["folder_path"]) == ("upload_folder", "me/house-numbers", "space", str(ROOT))
    assert up["allow_patterns"] == SPACE_FILES
    with pytest.raises(FileNotFoundError):  # a folder without the app is not published
        publish("me/x", tmp_path, api=RecordingHub())


@pytest.mark.slow
def test_the_uploaded_files_alone_serve_the_app(tmp_path):
    """A copy holding only what is uploaded builds the app (its models load from the copied checkpoints)."""
    for f in space_files(ROOT):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    code = ("import app; from digit_demo.pipeline import Pipeline;"
            "print(Pipeline().read(['examples/10963.png']).at()[0].text, len(app.demo.fns))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    assert r.returncode == 0, r.stderr[-2000:]
    number, events = r.stdout.split()
    assert number == "23" and int(events) > 5  # examples/10963.png shows 23
