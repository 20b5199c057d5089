"""Publishing the app as a Hugging Face Space through the Hub's HTTP API (``huggingface_hub``).

The Hub refuses a ``git push`` that holds binary files, or files over 10 MB, outside its large-file
storage; ``HfApi.upload_folder`` stores such files there itself. :data:`SPACE_FILES` names what the
Space needs to run (the app, the library, the checkpoints, the examples, the README with its front
matter); nothing else of the repository (tests, training code, data) is uploaded.
"""
from __future__ import annotations

from pathlib import Path

from huggingface_hub.utils import filter_repo_objects

ROOT = Path(__file__).resolve().parent.parent
# What a Space runs (patterns as huggingface_hub matches them: fnmatch on the path relative to the root).
SPACE_FILES = ["README.md", "app.py", "requirements.txt", "digit_demo/*.py", "checkpoints/*.safetensors",
               "checkpoints/*.json", "checkpoints/README.md", "examples/*.png", "examples/*.jpg", "docs/app.png"]
IGNORED = ["*/__pycache__/*", "*.pyc"]


def space_files(root: Path = ROOT) -> list[str]:
    """The files under ``root`` that :func:`publish` uploads, relative to it, sorted (the Hub's own
    pattern matching, :func:`huggingface_hub.utils.filter_repo_objects`)."""
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".git" not in p.parts)
    return list(filter_repo_objects(paths, allow_patterns=SPACE_FILES, ignore_patterns=IGNORED))


def publish(repo_id: str, root: Path = ROOT, api=None, token: str | None = None, private: bool = False,
            message: str = "Publish the house-number reader") -> str:
    """Create the Space ``repo_id`` (Gradio SDK) if it does not exist and upload :func:`space_files`
    in one commit; returns the commit's URL. ``api`` is a :class:`huggingface_hub.HfApi` (default: a
    new one with ``token``, else the logged-in user's or ``$HF_TOKEN``)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    files = space_files(root)
    if "app.py" not in files or not any(f.endswith(".safetensors") for f in files):
        raise FileNotFoundError(f"{root}: no app.py or no checkpoints to publish")
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=str(root), allow_patterns=SPACE_FILES,
                             ignore_patterns=IGNORED, commit_message=message)
    return str(getattr(info, "commit_url", info))
