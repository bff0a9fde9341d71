"""Hub ids in a merge recipe: downloaded through huggingface_hub when online (mocked here: no machine
reaches the hub), one line naming the id when the hub cannot provide it; the card keeps the ids."""

from __future__ import annotations

import pytest
import yaml
from safetensors.torch import load_file

import fastmerge
from fastmerge.cli import main
from fastmerge.errors import FastmergeError
from fastmerge.recipe import load_recipe


def _recipe(base, *models) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (0.6, 0.3))]}


@pytest.fixture
def hub(monkeypatch, families):
    """A fake hub serving a tiny family under ids; records what was asked."""
    import huggingface_hub

    base, ft0, ft1 = families("llama")
    served = {"acme/base": base, "acme/ft0": ft0, "acme/ft1": ft1}
    asked: list[tuple[str, tuple]] = []

    def snapshot_download(repo_id, allow_patterns=None, **_):
        asked.append((repo_id, tuple(allow_patterns or ())))
        if repo_id not in served:
            raise OSError(f"Repository Not Found for url: https://huggingface.co/{repo_id}")
        return str(served[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return served, asked


def test_hub_ids_merge_like_local_directories(hub, tmp_path):
    served, asked = hub
    fastmerge.merge(_recipe("acme/base", "acme/ft0", "acme/ft1"), tmp_path / "hub")
    fastmerge.merge(_recipe(served["acme/base"], served["acme/ft0"], served["acme/ft1"]), tmp_path / "local")
    a, b = load_file(tmp_path / "hub/model.safetensors"), load_file(tmp_path / "local/model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert sorted(r for r, _ in asked) == ["acme/base", "acme/ft0", "acme/ft1"]
    assert all("*.safetensors" in p and not any(x.endswith(".bin") for x in p) for _, p in asked)  # no pickles
    card = (tmp_path / "hub/README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == ["acme/base", "acme/ft0", "acme/ft1"]  # the ids, not cache paths
    assert load_recipe(tmp_path / "hub/mergekit_config.yml").base_model == "acme/base"


def test_an_id_the_hub_cannot_provide_is_one_line(hub, tmp_path, capsys):
    with pytest.raises(FastmergeError, match=r"^acme/missing: not a local directory, and the hub could not provide "
                                             r"it \(OSError: Repository Not Found"):
        fastmerge.merge(_recipe("acme/base", "acme/missing", "acme/ft1"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(_recipe("acme/base", "acme/ft0", "acme/missing")))
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmerge: error: acme/missing: not a local directory")


def test_a_local_directory_wins_over_the_hub(hub, tmp_path, monkeypatch, families):
    """A relative path that looks like an id but exists is the directory: the hub is not asked."""
    served, asked = hub
    base, ft0, ft1 = families("llama")
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "ft0").symlink_to(ft0, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    fastmerge.merge(_recipe(base, "acme/ft0", ft1), tmp_path / "out")
    assert asked == []
