"""The benchmark harness: the training cost ratio (S2P paper, App. D.2), resumable runs, the CLI."""

import json
import os
import re

import pytest
import torch

from zoptim import cost_ratio
from zoptim.bench import harness
from zoptim.bench.harness import RunSpec
from zoptim.problems import Quadratic, get_problem


# -- training cost ratio on hand-made curves --------------------------------------------------------
def test_smoothing_is_a_running_minimum_of_an_ema():
    assert cost_ratio.smooth([4.0, 2.0, 3.0, 1.0], beta=0.5) == [4.0, 3.0, 3.0, 2.0]
    assert cost_ratio.smooth([1.0, float("nan"), 0.5], beta=0.0) == [1.0, 1.0, 0.5]


def test_baseline_row_is_the_fractions_of_its_budget_on_a_strictly_decreasing_curve():
    q = list(range(0, 1001, 100))
    ga = [10.0 - i for i in range(11)]  # strictly decreasing: reaches each target exactly on time
    ratios = cost_ratio.cost_ratios((q, ga), {"GA": (q, ga)}, beta=0.0)
    assert ratios["GA"] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_a_method_twice_as_fast_has_half_the_ratio_and_a_slow_one_is_not_reached():
    q = list(range(0, 1001, 100))
    ga = [10.0 - i for i in range(11)]
    fast = [10.0 - min(2 * i, 10) for i in range(11)]  # GA's loss at 2x the queries
    slow = [10.0 - 0.5 * i for i in range(11)]  # ends at GA's 50 % loss: later targets never reached
    r = cost_ratio.cost_ratios((q, ga), {"fast": (q, fast), "slow": (q, slow)}, beta=0.0)
    assert r["fast"] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    assert r["slow"][:3] == [None, None, None]  # targets 0, 2, 4 are below its final loss 5
    assert r["slow"][3:] == pytest.approx([0.8, 0.4])


def test_ratio_uses_queries_not_steps():
    # STP's curve is recorded at 3 queries a step: the ratio divides queries by GA's total queries.
    ga_q, ga = [0, 300, 600], [3.0, 2.0, 1.0]
    stp_q, stp = [0, 300, 600, 900], [3.0, 2.0, 1.5, 1.0]
    r = cost_ratio.cost_ratios((ga_q, ga), {"STP": (stp_q, stp)}, fractions=(1.0,), beta=0.0)
    assert r["STP"] == [pytest.approx(1.5)]


def test_not_reached_is_shown_as_such_never_as_a_number():
    cells = cost_ratio.aggregate([[None, 0.5], [None, 0.7], [None, None]])
    assert cost_ratio.format_cell(cells[0]) == "n/r"
    assert cost_ratio.format_cell(cells[1]) == "0.60 ± 0.10 (2/3)"
    table = cost_ratio.markdown_table({"task": {"GA": cost_ratio.aggregate([[1.0, 0.8, 0.6, 0.4, 0.2]]),
                                                "X": cost_ratio.aggregate([[None] * 5])}})
    assert "| task | GA | 1.00 ± 0.00 | 0.80 ± 0.00 |" in table
    assert table.splitlines()[-1] == "|  | X | n/r | n/r | n/r | n/r | n/r |"


# -- harness -------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        RunSpec("e", "p", "ZOSGD", 0, 0)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        harness.run(RunSpec("e", "p", "nope", 0, 10), Quadratic(dim=5), tmp_path)
    with pytest.raises(ValueError, match="unknown problem"):
        get_problem("nope")
    from zoptim.bench import run_suite

    with pytest.raises(ValueError, match="unknown suite"):
        run_suite("nope", tmp_path)


def test_every_method_records_queries_at_its_own_cost_per_step(tmp_path):
    problem = Quadratic(dim=20, cond=10.0)
    hp = {"lr": 0.1, "eps": 1e-3, "stp_lr": 0.1, "s2p_lr": 5.0, "eta_b": 5.0}
    for method, qps in [("ZOSGD", 2), ("STP", 3), ("S2P", 2), ("AS2P", 2), ("ZOSGD-k4", 8)]:
        recs = harness.run(RunSpec("t", "quad", method, 0, 240, hp, num_evals=4), problem, tmp_path, progress=False)
        evals = [r for r in recs if r["type"] == "eval"]
        assert recs[0]["queries_per_step"] == qps
        assert evals[-1]["queries"] == (240 // qps) * qps
        assert all(r["queries"] == r["step"] * qps for r in evals)
        assert evals[-1]["loss"] < evals[0]["loss"]


def test_every_recipe_builds_on_a_model_and_knows_its_queries_per_step():
    """Each recipe of the bench (forward-applied, per-example, orthogonalised ones included) builds its
    optimizer over a small network, and its queries per step (asked of a model-free probe) is 2k or 3."""
    from zoptim.bench.methods import RECIPES

    for name, method in RECIPES.items():
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        hp = {"lr": 1e-3, "eps": 1e-3, "stp_lr": 1e-3, "s2p_lr": 1.0, "eta_b": 5.0}
        opt, _ = method.build(model.parameters(), hp, total_steps=10, seed=0, module=model)
        assert method.queries_per_step == opt.queries_per_step, name
        for option in ("per_example", "orthogonalize", "normalize_by_spread"):
            assert getattr(opt, option, False) == bool(method.options.get(option, False)), (name, option)
        if method.options.get("rank") is not None:
            opt.close()


def test_a_recipe_with_frozen_embeddings_tunes_every_trainable_tensor_but_the_embedding_block():
    """``freeze_embeddings``: the tensors named ``*embeddings*`` (a Hugging Face embedding block, its
    LayerNorm included) are left out of the optimizer; every other trainable tensor is tuned, and a
    tensor the model already froze stays out."""
    from zoptim.bench.methods import RECIPES

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = torch.nn.ModuleDict({"word_embeddings": torch.nn.Embedding(10, 4),
                                                   "LayerNorm": torch.nn.LayerNorm(4)})
            self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
            self.head.bias.requires_grad_(False)

    model = Tiny()
    frozen, plain = RECIPES["ZOSGD-lowrank-r4-frozenemb"], RECIPES["ZOSGD-lowrank-r4"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in frozen.parameters(model)] == ["body.weight", "body.bias", "head.weight"]
    assert len(plain.parameters(model)) == 6
    opt, _ = frozen.build(frozen.parameters(model), {"lr": 1e-3, "eps": 1e-3}, total_steps=4, seed=0, module=model)
    assert [p for g in opt.param_groups for p in g["params"]] == frozen.parameters(model)
    opt.close()
    with pytest.raises(ValueError, match="ZOSGD-lowrank-r4-frozenemb freezes the embedding block; Linear has no"):
        frozen.parameters(torch.nn.Linear(3, 2))


def test_search_gives_each_new_method_the_trials_of_the_method_it_extends(tmp_path):
    """GA's alpha_0 x rho_0 grid for ZOSGD-momentum and HiZOO (as many trials as GA), AS2P's eta_b
    grid for AS2P-momentum; their picks are per-method overrides of the shared values."""
    from zoptim.bench import search

    problem = Quadratic(dim=20, cond=10.0)
    problem.lr_grid, problem.eps_grid = (0.3, 0.1, 0.03), (1e-3, 1e-2)
    methods = ["ZOSGD", "AS2P", "ZOSGD-momentum", "HiZOO", "AS2P-momentum"]
    found = search.search("quad", problem, methods, 120, tmp_path, "t", progress=False)
    count = lambda m: sum(t["method"] == m for t in found["trials"])
    assert count("ZOSGD") == count("ZOSGD-momentum") == count("HiZOO") == 6
    assert count("AS2P") == count("AS2P-momentum") == len(search.ETA_B_GRID)
    for m in ["ZOSGD-momentum", "HiZOO"]:
        scores = {(t["hparams"]["lr"], t["hparams"]["eps"]): t["score"] for t in found["trials"] if t["method"] == m}
        best = min(scores, key=scores.get)
        assert search.hparams_for(m, found) == {**found["chosen"], "lr": best[0], "eps": best[1]}
    assert set(search.hparams_for("AS2P-momentum", found)) == set(found["chosen"])
    assert search.hparams_for("ZOSGD", found) == found["chosen"]  # GA and the paper's methods: the shared values


def test_every_ga_recipe_that_changes_its_directions_searches_its_own_lr_or_takes_a_base_rows():
    """A ZOSGD row that changes how its directions are drawn or applied (rank, per example, a frozen
    block) changes the step's scale, so it must not silently run at GA's pick: it searches lr x eps
    itself, on GA's grid or the normalised grid, or takes a named base row's values."""
    from zoptim.bench import search
    from zoptim.bench.methods import RECIPES

    changed = [name for name, m in RECIPES.items() if m.kind == "zosgd"
               and any(m.options.get(k) for k in ("rank", "per_example", "freeze_embeddings"))]
    assert "ZOSGD-perexample-r8-guard" in changed and "ZOSGD-perexample-r4-spread" in changed
    unsearched = [name for name in changed if name not in search.LR_EPS_SEARCHED and not search.normalised(name)
                  and name not in search.SHARES_SEARCH]
    assert unsearched == []


def test_a_sparse_embedding_row_takes_its_base_rows_search_and_runs_no_trials_of_its_own(tmp_path):
    from zoptim.bench import search

    problem = get_problem("digits-mlp")
    problem.lr_grid, problem.eps_grid = (0.1, 0.03), (1e-2,)
    found = search.search("digits-mlp", problem, ["ZOSGD", "ZOSGD-perexample-r4-sparse"], 40, tmp_path, "t",
                          progress=False)
    count = lambda m: sum(t["method"] == m for t in found["trials"])
    assert count("ZOSGD") == count("ZOSGD-perexample-r4") == 2 and count("ZOSGD-perexample-r4-sparse") == 0
    assert search.hparams_for("ZOSGD-perexample-r4-sparse", found) == search.hparams_for("ZOSGD-perexample-r4", found)


def test_a_search_for_some_rows_keeps_the_picks_of_rows_an_earlier_search_covered(tmp_path):
    """`zoptim bench --methods A B` after a run of the whole suite: the record keeps every row's pick,
    as long as both searches agree on the budget and the shared (GA's) values."""
    from zoptim.bench import search

    problem = Quadratic(dim=20, cond=10.0)
    problem.lr_grid, problem.eps_grid = (0.3, 0.1, 0.03), (1e-3,)
    whole = search.search("quad", problem, ["ZOSGD", "ZOSGD-momentum", "ZOSGD-guard"], 120, tmp_path, "t", progress=False)
    some = search.search("quad", problem, ["ZOSGD", "ZOSGD-guard"], 120, tmp_path, "t", progress=False)
    assert "ZOSGD-momentum" not in some["per_method"]
    kept = search.merged(some, whole)
    assert kept["per_method"] == whole["per_method"] and kept["chosen"] == some["chosen"]
    assert sorted(t["method"] for t in kept["trials"]) == sorted(t["method"] for t in whole["trials"])
    assert search.merged(some, {**whole, "budget": 240}) == some  # another search: nothing carried over
    assert search.merged(some, None) == some


def test_a_problem_with_a_test_split_gets_its_accuracy_recorded_and_reported_after_each_run(tmp_path):
    """At the final weights of every run but a search trial; the summary gains a column."""
    from zoptim.bench.report import build_report

    class Graded(Quadratic):
        def test_accuracy(self, model):
            return 1.0 / (1.0 + float(model.x.detach().square().sum()))

    problem = Graded(dim=5)
    recs = harness.run(RunSpec("t", "quad", "ZOSGD", 0, 40, {"lr": 0.1, "eps": 1e-3}, num_evals=2), problem, tmp_path,
                       progress=False)
    assert 0.0 < recs[-1]["test_accuracy"] <= 1.0
    trial = harness.run(RunSpec("search-t", "quad", "ZOSGD", 0, 40, {"lr": 0.1, "eps": 1e-3}, num_evals=2), problem,
                        tmp_path, progress=False)
    assert "test_accuracy" not in trial[-1]
    assert f"| {recs[-1]['test_accuracy']:.3f} ± 0.000 (1) |" in build_report(tmp_path)


def test_an_interrupted_run_resumes_to_the_same_records(tmp_path):
    problem = get_problem("digits-mlp")
    spec = RunSpec("t", "digits-mlp", "AS2P", 1, 400, dict(problem.default_hparams), num_evals=10)
    whole = harness.run(spec, problem, tmp_path / "a", progress=False)

    class Stop(Exception):
        pass

    def stop_after_4(rec):
        if rec["step"] >= 4 * 20:
            raise Stop

    with pytest.raises(Stop):
        harness.run(spec, problem, tmp_path / "b", checkpoint_seconds=0.0, progress=False, on_eval=stop_after_4)
    assert not (tmp_path / "b" / "raw").exists()  # nothing half-written
    assert list((tmp_path / "b" / "checkpoints").glob("*.pt"))
    resumed = harness.run(spec, problem, tmp_path / "b", progress=False)
    strip = lambda recs: [(r.get("queries"), r.get("loss"), r.get("gamma")) for r in recs if r["type"] == "eval"]
    assert strip(resumed) == strip(whole)
    assert not list((tmp_path / "b" / "checkpoints").glob("*.pt"))
    # A finished run is skipped: its file is returned as is.
    assert harness.run(spec, problem, tmp_path / "b", progress=False) == resumed


def test_cli_end_to_end_writes_jsonl_summary_and_plots(tmp_path, capsys):
    from zoptim.cli import main

    out = tmp_path / "quick"
    args = ["bench", "--suite", "quick", "--problems", "digits-mlp", "--seeds", "2", "--budget", "300"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| digits-mlp | ZOSGD | 1.00" in printed
    raws = sorted((out / "raw").glob("*.jsonl"))
    assert len(raws) == 5 * 2
    header = json.loads(raws[0].read_text().splitlines()[0])
    assert header["type"] == "run" and header["budget"] == 300 and "lr" in header["hparams"]
    assert header["num_evals"] == 30  # the quick suite's
    summary = (out / "summary.md").read_text()
    for name in ["ZOSGD-rademacher", "STP", "S2P", "AS2P"]:
        assert f"| {name} |" in summary
    for png in ["quick-digits-mlp-loss.png", "quick-digits-mlp-cost-ratio.png", "quick-digits-mlp-as2p-dynamics.png"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # --report rebuilds the same summary from the raw records.
    (out / "summary.md").unlink()
    assert main(["bench", "--report", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary


def test_cli_rejects_bad_arguments(tmp_path):
    from zoptim.cli import main

    with pytest.raises(SystemExit, match="budget"):
        main(["bench", "--suite", "quick", "--budget", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown suite"):
        main(["bench", "--suite", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="evals"):
        main(["bench", "--suite", "quick", "--evals", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown method"):
        main(["bench", "--suite", "quick", "--methods", "Adam", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--set takes KEY=VALUE"):
        main(["bench", "--suite", "quick", "--set", "momentum=0.9", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--set lr must be a number"):
        main(["bench", "--suite", "quick", "--set", "lr=fast", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="finite number > 0"):
        main(["bench", "--suite", "quick", "--set", "lr=-1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="searches its hyper-parameters"):
        main(["bench", "--suite", "methods-quick", "--set", "lr=1e-3", "--out", str(tmp_path)])


def test_set_replaces_the_problems_default_hyper_parameters_for_every_method(tmp_path):
    from zoptim.cli import main

    args = ["bench", "--suite", "methods", "--problems", "quadratic", "--methods", "ZOSGD", "HiZOO", "--seeds", "1",
            "--budget", "60", "--evals", "2", "--set", "lr=0.002", "eps=0.01", "--out", str(tmp_path)]
    assert main(args) == 0
    raws = sorted((tmp_path / "raw").glob("*.jsonl"))
    assert len(raws) == 2
    for path in raws:
        header = json.loads(path.read_text().splitlines()[0])
        assert header["hparams"]["lr"] == 0.002 and header["hparams"]["eps"] == 0.01
        assert header["hparams"]["stp_lr"] == 1e-2  # keys not set keep the problem's default


def test_under_torchrun_the_runs_are_shared_out_and_give_the_single_process_records(tmp_path, monkeypatch, capsys):
    """What torchrun's two workers do, run one after the other: rank 1 runs its share and returns,
    rank 0 runs the rest, waits for rank 1's results and writes the report."""
    from zoptim.cli import main

    args = ["bench", "--suite", "quick", "--problems", "digits-mlp", "--methods", "ZOSGD", "AS2P", "STP", "--seeds", "1",
            "--budget", "120"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert main([*args, "--out", str(tmp_path / "shared")]) == 0
        if rank == 1:  # its share only (runs 1 of 0, 1, 2), and no report yet
            assert len(list((tmp_path / "shared" / "raw").glob("*.jsonl"))) == 1
            assert not (tmp_path / "shared" / "summary.md").exists()

    def records(folder):
        out = {}
        for path in sorted((tmp_path / folder / "raw").glob("*.jsonl")):
            out[path.name] = [{k: v for k, v in json.loads(line).items() if k != "wall"}
                              for line in path.read_text().splitlines()]
        return out

    assert records("shared") == records("single") and len(records("single")) == 3
    assert (tmp_path / "shared" / "summary.md").exists()


def test_problems_pick_from_each_experiments_own_problems(tmp_path, monkeypatch):
    """A suite whose experiments set other hyper-parameters per problem: --problems runs each
    problem only in the experiment that lists it (lowrank-lm's LoRA and full-parameter halves)."""
    from zoptim.bench import suites

    monkeypatch.setitem(suites.SUITES, "two", lambda budget, seeds: [
        suites.Experiment("two", ["quadratic"], ["ZOSGD"], 1, 60, num_evals=2),
        suites.Experiment("two", ["digits-mlp"], ["ZOSGD"], 1, 60, hparams={"lr": 1e-4}, num_evals=2)])
    suites.run_suite("two", tmp_path, problems=["digits-mlp"], progress=False, log=lambda msg: None)
    headers = [json.loads(p.read_text().splitlines()[0]) for p in (tmp_path / "raw").glob("*.jsonl")]
    assert [(h["problem"], h["hparams"]["lr"]) for h in headers] == [("digits-mlp", 1e-4)]


def test_cli_user_errors_are_one_line_before_any_work(tmp_path):
    from zoptim.cli import main

    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"^zoptim bench: --out .*results\.txt is a file; give a folder"):
        main(["bench", "--suite", "quick", "--problems", "digits-mlp", "--out", str(afile)])
    with pytest.raises(SystemExit, match=r"^zoptim bench: --report .*nowhere: no such folder"):
        main(["bench", "--report", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("content,why", [(b"\x00garbage" * 10, "is truncated or corrupted"),
                                         ("crafted", "holds objects other than tensors")])
def test_a_corrupt_or_crafted_bench_checkpoint_is_one_line_naming_the_file(tmp_path, content, why):
    from zoptim.cli import main

    args = ["bench", "--suite", "quick", "--problems", "digits-mlp", "--methods", "ZOSGD", "--seeds", "1",
            "--budget", "60", "--evals", "2", "--out", str(tmp_path)]
    ckpt = tmp_path / "checkpoints" / "quick__digits-mlp__ZOSGD__seed0__x.pt"
    ckpt.parent.mkdir(parents=True)
    if content == "crafted":
        class Payload:
            def __reduce__(self):
                return (os.system, ("echo pickled code ran",))

        torch.save({"model": Payload()}, ckpt)
    else:
        ckpt.write_bytes(content)
    with pytest.raises(SystemExit, match=rf"^zoptim bench: checkpoint .*{ckpt.name} {why}"):
        main(args)
    assert not (tmp_path / "raw").exists()  # refused before any run


def _write_many(args):
    from zoptim.checkpoint import atomic_write_text

    path, tag = args
    for i in range(200):
        atomic_write_text(path, f"{tag} {i}\n" * 50)
    return tag


def test_two_processes_writing_one_path_never_clash(tmp_path):
    import multiprocessing

    path = tmp_path / "summary.md"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert sorted(pool.map(_write_many, [(path, "a"), (path, "b")])) == ["a", "b"]
    lines = path.read_text().splitlines()
    assert len(lines) == 50 and len(set(lines)) == 1  # one whole file, from one of the writers
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]  # no temporary file left


def test_version_python_m_and_ctrl_c_are_what_a_command_line_user_expects(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    import zoptim
    from zoptim.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"zoptim {zoptim.__version__}"
    for command, shown in (("finetune", "(default: 200)"), ("bench", "(default: ")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert shown in " ".join(capsys.readouterr().out.split())  # --help shows the defaults
    ran = subprocess.run([sys.executable, "-m", "zoptim", "--version"], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout.strip() == f"zoptim {zoptim.__version__}"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("zoptim.bench.run_suite", interrupted)
    assert main(["bench", "--suite", "quick", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zoptim bench: interrupted; run the same command again to resume"]


def test_a_reused_out_keeps_runs_of_other_budgets_and_settings_apart(tmp_path):
    from zoptim.cli import main

    def bench(*extra):
        assert main(["bench", "--suite", "methods", "--problems", "quadratic", "--seeds", "1", "--evals", "3",
                     "--out", str(tmp_path), *extra]) == 0

    bench("--methods", "ZOSGD", "--budget", "60")
    bench("--methods", "ZOSGD", "AS2P", "--budget", "120")
    summary = (tmp_path / "summary.md").read_text()
    assert "## methods: quadratic (60 queries)" in summary and "## methods: quadratic (120 queries)" in summary
    section_120 = summary.split("## methods: quadratic (120 queries)")[1]
    assert "| ZOSGD | 120 |" in section_120 and "| AS2P | 120 |" in section_120 and "| 60 |" not in section_120
    bench("--methods", "ZOSGD", "--budget", "120", "--set", "lr=0.002")  # the same run, other settings
    summary = (tmp_path / "summary.md").read_text()
    assert "ZOSGD (older settings " in summary and "older ones are marked" in summary


@pytest.mark.parametrize("name,rank,per_example", [("ZOSGD-forward", None, False), ("ZOSGD-lowrank", 1, False),
                                                   ("ZOSGD-perexample", 1, True), ("ZOSGD", None, False)])
def test_recipes_reach_every_way_of_applying_directions(name, rank, per_example):
    """In place, full-rank directions in the forward, rank-1 ones, one per example: each a recipe."""
    from zoptim.bench.methods import get_method

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt, _ = get_method(name).build(model.parameters(), {"lr": 1e-3, "eps": 1e-3}, total_steps=4, seed=0, module=model)
    assert (opt.module is model) == (name != "ZOSGD") and opt.rank == rank and opt.per_example == per_example
    assert opt.engine.element_wise == (name == "ZOSGD")  # in place: the direction's elements are written
    opt.close()


def test_the_help_names_every_suite(capsys):
    from zoptim.bench.suites import SUITES
    from zoptim.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))  # argparse wraps at hyphens
    for name in SUITES:
        assert f"| {name} |" in text or f"| {name})" in text or f"({name} |" in text, name
