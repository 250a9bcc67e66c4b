"""Every key of the composed configs is read by some code, not only validated.

A key that is parsed and checked but never used is a promise the program does not keep
(``rollout.sync.verify_every`` once was one).  This walks every leaf of every preset as Hydra
composes it, maps it to the record field that holds it, and requires that the field's name be
read as an attribute somewhere in ``megatron_spin`` outside the records' own validation
(``__post_init__``).  It is a static check: a field whose name is a common word could be
"read" by an unrelated object; the check still catches a key that nothing reads at all.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

import megatron_spin
from megatron_spin.config.run import RunConfig

PACKAGE = Path(megatron_spin.__file__).parent
PRESETS = ("spin_trainer", "spin_8b", "spin_70b")


def _compose(preset: str) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="megatron_spin.config.conf", version_base=None):
        cfg = compose(config_name=preset)
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    return tree


def _leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


def _record_types(tp) -> list[type]:
    """The dataclass types a field's annotation can hold (through Optional / Union)."""
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]


def _field_of(key: str) -> tuple[type, str]:
    cls = RunConfig
    *sections, name = key.split(".")
    for part in sections:
        hints = typing.get_type_hints(cls)
        assert part in hints, f"{key}: {cls.__name__} has no section {part!r}"
        (cls,) = _record_types(hints[part])
    assert name in {f.name for f in dataclasses.fields(cls)}, f"{key}: {cls.__name__} has no field {name!r}"
    return cls, name


def _config_classes() -> set[str]:
    seen, todo = set(), [RunConfig]
    while todo:
        cls = todo.pop()
        if cls.__name__ in seen:
            continue
        seen.add(cls.__name__)
        for tp in typing.get_type_hints(cls).values():
            todo += _record_types(tp)
    return seen


def _attribute_reads(package: Path = PACKAGE) -> set[str]:
    """Attribute names read anywhere in ``package``, except inside config records' __post_init__."""
    records = _config_classes()
    reads: set[str] = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name in records:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__post_init__":
                        skip.update(id(n) for n in ast.walk(item))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in skip:
                reads.add(node.attr)
    return reads


@pytest.fixture(scope="module")
def reads() -> set[str]:
    return _attribute_reads()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_leaf_maps_to_a_field_that_code_reads(preset, reads):
    leaves = sorted(set(_leaves(_compose(preset))))
    assert len(leaves) > 60, leaves  # the walk really reached the leaves
    unread = []
    for key in leaves:
        cls, name = _field_of(key)
        if name not in reads:
            unread.append(f"{key} ({cls.__name__}.{name})")
    assert not unread, f"config keys no code reads (wire them or remove them): {unread}"


def test_the_check_fails_for_a_key_only_validation_reads(tmp_path):
    """The walk is not vacuous: a field read only in a record's __post_init__ is not a read."""
    (tmp_path / "record.py").write_text(
        "import dataclasses\n@dataclasses.dataclass\nclass SyncConfig:\n    only_checked: int = 0\n"
        "    used: int = 0\n    def __post_init__(self):\n        assert self.only_checked >= 0\n")
    (tmp_path / "user.py").write_text("def f(cfg):\n    return cfg.used\n")
    reads = _attribute_reads(tmp_path)
    assert "used" in reads and "only_checked" not in reads
