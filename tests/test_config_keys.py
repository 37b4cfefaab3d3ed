"""The README's key table is `longtrain config --keys --markdown` (it fails when they drift), and
every recipe key has a type, a default and a meaning."""
import dataclasses
import typing
from pathlib import Path

from longtrain.launcher.cli import main
from longtrain.launcher.config import Recipe
from longtrain.models.transformer import RopeScaling
from longtrain.launcher.config_keys import README_BEGIN, README_END, keys_markdown, recipe_keys

README = Path(__file__).resolve().parent.parent / "README.md"


def _leaf_keys(cls, prefix=""):
    """Every leaf field of the recipe dataclasses, written out independently of config_keys."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]) and hints[f.name] is not RopeScaling:
            out += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_key_is_listed_with_a_meaning():
    rows = recipe_keys()
    assert [key for key, *_ in rows] == _leaf_keys(Recipe)
    assert not [key for key, _, _, meaning in rows if not meaning]
    by_key = {key: (tp, default) for key, tp, default, _ in rows}
    assert by_key["parallel.cp_mode"][0].split(" \\| ")[:2] == ["auto", "ring"]
    assert by_key["train.loss_chunk_tokens"][1] == "1024"
    assert by_key["run.launch.max_restarts"][1] == "0"


def test_readme_key_table_is_the_generated_one():
    text = README.read_text()
    assert README_BEGIN in text and README_END in text, "README lost its generated key table markers"
    table = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert table == keys_markdown(), "README's key table drifted: paste `longtrain config --keys --markdown`"


def test_cli_prints_keys(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "parallel.ladder_overlap" in out and "train.on_nonfinite" in out
    assert main(["config"]) == 2
