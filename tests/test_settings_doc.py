"""docs/SETTINGS.md is generated from TrainConfig and current; the docs' relative links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from tinkerkit import settings_doc
from tinkerkit.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_settings_md_is_generated_from_the_config():
    path = ROOT / "docs" / "SETTINGS.md"
    current = path.read_text(encoding="utf-8")
    assert current == settings_doc.update(current), (
        f"docs/SETTINGS.md differs from TrainConfig: run `.venv/bin/{settings_doc.REGENERATE}` "
        "and commit the result")


def test_every_field_is_one_row_with_its_description():
    table = settings_doc.render_table()
    for name, info in TrainConfig.model_fields.items():
        rows = [line for line in table.splitlines() if line.startswith(f"| `{name.upper()}` |")]
        assert len(rows) == 1, name
        assert " ".join(info.description.split()).replace("|", "\\|") in rows[0].replace(
            "&lt;", "<").replace("&gt;", ">"), name


def test_groups_follow_the_comments_of_the_class_body():
    groups = dict(settings_doc.field_groups())
    assert groups["Data"][0] == "data_files"
    assert "lora_rank" in groups["Model and LoRA"]
    assert sum(len(names) for names in groups.values()) == len(TrainConfig.model_fields)


def test_cells():
    fields = TrainConfig.model_fields
    assert settings_doc.render_default("learning_rate", fields["learning_rate"]) == "`0.0001`"
    assert settings_doc.render_default("data_files", fields["data_files"]) == "`[]`"
    assert settings_doc.render_default("train_on", fields["train_on"]) == '`"all_assistant"`'
    assert settings_doc.render_default("tinker_base_url", fields["tinker_base_url"]) == \
        "`$TINKER_BASE_URL`"
    assert settings_doc.render_values(fields["lora_dropout"]) == "float in [0, 1)"
    assert settings_doc.render_values(fields["max_steps"]) == "int > 0 or None"
    assert settings_doc.render_values(fields["mixed_precision"]) == "`auto`, `bf16` or `no`"
    assert settings_doc.render_values(fields["activation_checkpointing"]) == "bool or `auto`"


def test_a_computed_default_needs_its_display():
    class Config(BaseModel):
        # Group
        name: str = Field(default_factory=lambda: "from the environment", description="x")

    with pytest.raises(ValueError, match="FACTORY_DEFAULTS"):
        settings_doc.render_table(Config)


def test_update_needs_both_markers():
    with pytest.raises(ValueError, match="expected the lines"):
        settings_doc.update("# Settings\n")
    document = f"before\n{settings_doc.BEGIN}\nold table\n{settings_doc.END}\nafter\n"
    updated = settings_doc.update(document)
    assert updated.startswith(f"before\n{settings_doc.BEGIN}\n\n### ")
    assert updated.endswith(f"{settings_doc.END}\nafter\n") and "old table" not in updated
    assert settings_doc.update(updated) == updated


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "SETTINGS.md"
    stale.write_text(f"{settings_doc.BEGIN}\n{settings_doc.END}\n", encoding="utf-8")
    assert settings_doc.main(["--path", str(stale), "--check"]) == 1
    assert settings_doc.REGENERATE in capsys.readouterr().err
    assert settings_doc.main(["--path", str(stale)]) == 0
    assert settings_doc.main(["--path", str(stale), "--check"]) == 0


# -- links between the docs


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _prose_lines(path: Path) -> list[str]:
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    for line in _prose_lines(path):
        if heading := re.match(r"#{1,6} (.+)", line):
            slug, n = _slug(heading.group(1)), 0
            while (candidate := slug if n == 0 else f"{slug}-{n}") in anchors:
                n += 1
            anchors.add(candidate)
    return anchors


def _links(path: Path) -> list[str]:
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in _prose_lines(path))
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    broken = []
    for link in _links(doc):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        target_path = (doc.parent / target).resolve() if target else doc
        if not target_path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target_path.suffix == ".md" and anchor not in _anchors(target_path):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_readme_points_to_the_reference_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in ("docs/SETTINGS.md", "docs/PERFORMANCE.md"):
        assert f"]({doc}" in readme, doc
