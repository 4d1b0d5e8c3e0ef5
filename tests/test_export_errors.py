"""A torch module that cannot be exported gets one readable line: the real cause and the
user's source line, never torch's terminal colour codes or its page of next steps."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from optcc.errors import ModelError  # noqa: E402
from optcc.frontend import export_torch  # noqa: E402

MODULES = '''
import torch


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class NoOnnxOp(torch.nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real


def data_dependent():
    return DataDependent()


def no_onnx_op():
    return NoOnnxOp()
'''


@pytest.mark.parametrize(
    ("factory", "exporter", "expected"),
    [
        ("data_dependent", "dynamo",
         "GuardOnDataDependentSymNode: Could not guard on data-dependent expression"),
        ("no_onnx_op", "legacy", "fft"),
    ],
)
def test_export_error_is_one_plain_line(tmp_path: Path, factory: str, exporter: str, expected: str) -> None:
    (tmp_path / "bad_modules.py").write_text(MODULES)
    with pytest.raises(ModelError) as info:
        export_torch(f"bad_modules.py:{factory}", inputs=[{"name": "x", "shape": ["batch", 4]}],
                     exporter=exporter, base_dir=tmp_path)
    message = str(info.value)
    assert "\x1b" not in message and "\n" not in message
    assert message.startswith(f"torch:bad_modules.py:{factory}: torch.onnx export ({exporter}) failed: ")
    assert expected in message
    if exporter == "dynamo":  # torch names the user's line that made export fail
        assert "(at bad_modules.py:7 in forward: if x.sum() > 0:)" in message


def test_export_error_names_the_cause_even_when_it_was_dropped_on_re_raise(tmp_path: Path) -> None:
    from optcc.frontend import export_failure

    (tmp_path / "bad_modules.py").write_text(MODULES)
    with pytest.raises(ModelError) as info:
        export_torch("bad_modules.py:data_dependent", inputs=[{"name": "x", "shape": ["batch", 4]}],
                     exporter="dynamo", base_dir=tmp_path)
    wrapped = info.value.__cause__
    assert wrapped is not None
    wrapped.__cause__ = None  # what `raise error from None` does to it
    line = export_failure(wrapped)
    assert line.startswith("GuardOnDataDependentSymNode: Could not guard on data-dependent expression")
    assert "\x1b" not in line and line.endswith("(at bad_modules.py:7 in forward: if x.sum() > 0:)")

