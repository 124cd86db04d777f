"""``adapterfast.register()``/``unregister()``: what adapterfast changes in PEFT and AdapterHub, seen and undone.

Each case runs in a fresh process, so the import-time state is the real one and the other tests'
registration is left alone.
"""
import subprocess
import sys
import textwrap

import pytest

_PEFT = textwrap.dedent("""
    import sys
    import adapterfast
    from adapterfast.integrations import registration
    finders = lambda: [f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterPeftImport"]
    assert "peft" not in sys.modules and len(finders()) == 1 and registration.is_registered()
    adapterfast.unregister()
    assert finders() == [] and not registration.is_registered()
    from peft import mapping
    assert "ADAPTERFAST" not in mapping.PEFT_TYPE_TO_CONFIG_MAPPING      # nothing registered on import now
    adapterfast.register()
    assert finders() == []                                              # PEFT is imported: registered at once
    for table in (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, mapping.PEFT_TYPE_TO_TUNER_MAPPING,
                  mapping.PEFT_TYPE_TO_PREFIX_MAPPING):
        assert "ADAPTERFAST" in table
    adapterfast.unregister()
    for table in (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, mapping.PEFT_TYPE_TO_TUNER_MAPPING,
                  mapping.PEFT_TYPE_TO_PREFIX_MAPPING):
        assert "ADAPTERFAST" not in table
    adapterfast.unregister()                                            # idempotent
    adapterfast.register(); adapterfast.register()
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["ADAPTERFAST"] == "adapterfast_"
    print("ok")
""")

_PEFT_FIRST_IMPORTED_BY_US = textwrap.dedent("""
    import sys
    import adapterfast
    from adapterfast.integrations import peft as af_peft   # its own `import peft` is PEFT's first import
    from peft import mapping
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["ADAPTERFAST"] is af_peft.AdapterConfig
    assert not [f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterPeftImport"]
    print("ok")
""")

_ADAPTERHUB = textwrap.dedent("""
    import adapterfast
    from adapters.methods.bottleneck import BottleneckLayer
    before = dict(vars(BottleneckLayer))
    from adapterfast.integrations import adapterhub as ah
    assert dict(vars(BottleneckLayer)) == before                  # importing changes nothing
    ah.install()
    changed = sorted(k for k in vars(BottleneckLayer) if vars(BottleneckLayer).get(k) is not before.get(k))
    assert changed == sorted(ah._REPLACEMENTS), changed
    adapterfast.unregister()
    assert dict(vars(BottleneckLayer)) == before                  # every method the library's own again
    ah.uninstall()                                                # idempotent
    assert dict(vars(BottleneckLayer)) == before
    print("ok")
""")


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_peft_registration_is_visible_and_undoable():
    pytest.importorskip("peft")
    _run(_PEFT)


def test_registered_when_our_module_imports_peft_first():
    pytest.importorskip("peft")
    _run(_PEFT_FIRST_IMPORTED_BY_US)


def test_adapterhub_wrappers_come_off():
    pytest.importorskip("adapters")
    _run(_ADAPTERHUB)
