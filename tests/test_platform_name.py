"""platform/ must stay a plain folder: a package there would shadow the stdlib module."""

import platform
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_platform_folder_is_not_a_package():
    assert (REPO_ROOT / "platform").is_dir()
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_still_works():
    assert platform.system() in {"Linux", "Darwin", "Windows"}
    assert Path(platform.__file__).name == "platform.py"


def test_required_top_level_exists():
    for name in ["manage.py", "platform", "embeddings", "triage", "templates", "tests", "requirements.txt"]:
        assert (REPO_ROOT / name).exists(), name
