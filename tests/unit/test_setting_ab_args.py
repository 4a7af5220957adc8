"""`python -m bench.setting_ab` refuses arguments that contradict each other before it starts any server."""

from __future__ import annotations

import pytest

from bench import setting_ab


@pytest.mark.parametrize("extra", [["--mix", "create=1,add=3"], ["--queries"]])
def test_with_queries_refuses_a_mix_of_its_own(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        setting_ab.main(["--with-queries", *extra])
    assert exited.value.code == 2
    assert "--with-queries sets the load's mix itself" in capsys.readouterr().err
