"""The three-run summary issue 22 asks for: a target counts as met only when every run met it."""

from benchmarks.run import Table
from benchmarks.spread import spread, summary


def _table(jds: str, met: bool) -> dict:
    table = Table(["jds", "chp"], floors=True)
    table.add("kernel round trip", "2 ms", {"jds": jds, "chp": "2.5 ms"}, "≤ 1.15×", met, floor="2.6 ms")
    table.add("informative row", "1", {"jds": "x"})
    return table.as_dict()


def test_each_runs_jds_cell_and_the_count_of_runs_that_met_the_target():
    text = spread([_table("2.2 ms (1.10×)", True), _table("2.4 ms (1.20×)", False), _table("2.1 ms (1.05×)", True)])
    row = [line for line in text.splitlines() if line.startswith("| kernel round trip")]
    assert row == ["| kernel round trip | 2.2 ms (1.10×) | 2.4 ms (1.20×) | 2.1 ms (1.05×) | ≤ 1.15× | 2 of 3 |"]
    assert "informative row" not in text  # rows without a target are not part of the verdict


def test_a_target_missed_in_one_run_is_named_as_not_met():
    tables = [_table("a", True), _table("b", False), _table("c", True)]
    assert summary(tables).splitlines() == [
        "met in all 3 runs: 0 of 1 targets", "  not met in every run: kernel round trip"]
    assert summary([_table("a", True)] * 3) == "met in all 3 runs: 1 of 1 targets"
