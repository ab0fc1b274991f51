"""The image build's step cache: a step reruns exactly when its inputs, an earlier step or the epoch changed."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from image import build as image_build
from image.context import Context


def _fake_step(name: str, inputs: list[str], calls: list[str], output: str) -> str:
    module = types.ModuleType(f"fake_steps.{name}")

    def run(ctx: Context) -> None:
        calls.append(name)
        (ctx.out / output).write_text(name)

    module.INPUTS = inputs  # type: ignore[attr-defined]
    module.build = run  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    return module.__name__


def test_steps_rebuild_only_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    (repo / "image").mkdir(parents=True)
    (repo / "a.txt").write_text("one")
    (repo / "b.txt").write_text("two")
    calls: list[str] = []
    steps = (
        image_build.Step("first", _fake_step("first", ["a.txt"], calls, "first.out"), ("first.out",)),
        image_build.Step("second", _fake_step("second", ["b.txt"], calls, "second.out"), ("second.out",)),
    )
    monkeypatch.setattr(image_build, "STEPS", steps)
    ctx = Context(repo=repo, out=repo / "build")

    assert image_build.run(ctx, [], force=False).keys() == {"first", "second"}
    assert calls == ["first", "second"]
    assert set(image_build.run(ctx, [], force=False).values()) == {"cached"}
    assert calls == ["first", "second"]

    (repo / "b.txt").write_text("changed")
    image_build.run(ctx, [], force=False)
    assert calls[2:] == ["second"]  # only the step whose input changed

    (repo / "a.txt").write_text("changed")
    image_build.run(ctx, [], force=False)
    assert calls[3:] == ["first", "second"]  # a changed earlier step rebuilds everything after it

    (ctx.out / "second.out").unlink()
    image_build.run(ctx, [], force=False)
    assert calls[5:] == ["second"]  # a missing output is rebuilt

    image_build.run(Context(repo=repo, out=repo / "build", source_date_epoch=1), [], force=False)
    assert calls[6:] == ["first", "second"]  # another SOURCE_DATE_EPOCH is another build

    image_build.run(Context(repo=repo, out=repo / "build", source_date_epoch=1), ["first"], force=True)
    assert calls[8:] == ["first"]  # asking for a step stops there


def test_digest_covers_names_content_and_modes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    script = tmp_path / "d" / "s"
    script.write_text("x")
    first = image_build.digest_inputs(tmp_path, ["d"], "")
    script.chmod(0o755)
    second = image_build.digest_inputs(tmp_path, ["d"], "")
    script.rename(tmp_path / "d" / "t")
    third = image_build.digest_inputs(tmp_path, ["d"], "")
    assert len({first, second, third}) == 3
    assert image_build.digest_inputs(tmp_path, ["d"], "") == third
