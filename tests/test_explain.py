from PIL import Image

from experiments import explain


def test_explain_draws_every_figure_and_a_readme_snippet(tmp_path, capsys):
    explain.main(["--out", str(tmp_path)])
    printed = capsys.readouterr().out
    snippet = (tmp_path / "README_snippet.md").read_text()
    for name in explain.FIGURES:
        path = tmp_path / f"{name}.png"
        assert f"wrote {path}" in printed
        assert f"![{name}](docs/img/{name}.png)" in snippet
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 300
        assert 10_000 < path.stat().st_size < 150_000  # small enough to commit to docs/img
