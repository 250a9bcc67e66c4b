"""The CPU patches refuse a megatron-core release they were not written for, naming the fix."""

from __future__ import annotations

import pytest

from megatron_spin.platform import cpu_patches


def test_the_installed_release_is_accepted():
    assert cpu_patches.check_megatron_version().startswith("0.16.")


@pytest.mark.parametrize("version", ["0.15.2", "0.17.0", "1.0.0rc1"])
def test_other_releases_are_refused_naming_the_pin(version):
    with pytest.raises(cpu_patches.UnsupportedMegatronError) as info:
        cpu_patches.check_megatron_version(version)
    assert f"megatron-core {version} is installed" in str(info.value)
    assert "megatron-core==0.16.1" in str(info.value)


def test_a_missing_module_is_refused_not_skipped(monkeypatch):
    monkeypatch.setattr(cpu_patches, "_APPLIED", False)
    monkeypatch.setattr(cpu_patches, "_MEGATRON_MODULES", ("megatron.core.no_such_module",))
    with pytest.raises(cpu_patches.UnsupportedMegatronError, match=r"megatron\.core\.no_such_module does not import"):
        cpu_patches.apply()
