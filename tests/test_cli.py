import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from torchlowrank.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torchlowrank.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", [[], ["demo"], ["reproduce"], ["inspect"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: torchlowrank" in capsys.readouterr().out


def test_reproduce_list_names_the_registered_experiments(capsys):
    assert main(["reproduce", "--list"]) == 0
    assert "truncation-sweep" in capsys.readouterr().out


def test_the_registry_is_the_explicit_dict_and_takes_extra_experiments(monkeypatch):
    from torchlowrank.experiments import registry
    from torchlowrank.results import Result

    names = [e.name for e in registry.list_experiments()]
    assert names == sorted(registry.EXPERIMENTS)  # every built-in experiment, nothing discovered
    for e in registry.list_experiments():
        assert e.run.__module__ == f"torchlowrank.experiments.{registry.EXPERIMENTS[e.name]}"
        assert e.description
    sections = registry.demo_sections()
    assert [s.name for s in sections] == sorted(
        registry.DEMO_SECTIONS, key=lambda n: registry.DEMO_SECTIONS[n][2]
    )

    monkeypatch.setattr(registry, "_EXTRA_EXPERIMENTS", {})

    @registry.register_experiment("my-experiment", "an experiment defined elsewhere")
    def run(quick=False, seed=0, progress=None):
        return Result("my-experiment")

    assert registry.get_experiment("my-experiment").run is run
    assert "my-experiment" in [e.name for e in registry.list_experiments()]
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_experiment("movielens", "a second movielens")(run)


def test_unknown_experiment_is_a_clear_error(capsys):
    assert main(["reproduce", "no-such-thing"]) == 2
    assert "unknown experiment 'no-such-thing'; available:" in capsys.readouterr().err


def test_demo_core_section_writes_its_report(tmp_path):
    proc = run_cli("demo", "--sections", "truncation", "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "demo-truncation.json").read_text())
    # a trained MLP on digits is accurate, and truncation to half the parameters by energy keeps most of it
    assert result["metrics"]["dense_test_accuracy"] > 0.9
    assert result["metrics"]["accuracy_energy_0.5"] > 0.8
    assert (tmp_path / "demo-truncation_spectra.png").stat().st_size > 1000
    assert "Truncation to a parameter budget" in proc.stdout


def test_inspect_safetensors_and_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    low = torch.randn(20, 3) @ torch.randn(3, 16)
    save_file(
        {"layer.weight": low.contiguous(), "layer.bias": torch.zeros(20)}, str(tmp_path / "w.safetensors")
    )
    torch.save({"state_dict": {"layer.weight": low}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        assert main(["inspect", str(tmp_path / name), "--out", str(tmp_path / "rep")]) == 0
        out = capsys.readouterr().out
        assert "layer.weight" in out and "20x16" in out and "layer.bias" not in out
    assert (tmp_path / "rep" / "inspect_spectra.png").is_file()


def test_inspect_missing_or_corrupted_file_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "error" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    assert main(["inspect", str(tmp_path / "bad.safetensors")]) == 2


@pytest.mark.parametrize("junk", [b"junk", b"\x80\x02}q\x00", b"PK\x03\x04" + b"x" * 64])
def test_inspect_junk_checkpoint_exits_2_with_a_message(tmp_path, junk, capsys):
    path = tmp_path / "junk.pt"
    path.write_bytes(junk)
    assert main(["inspect", str(path)]) == 2  # an exception escaping main() would fail the test
    assert "could not be read" in capsys.readouterr().err


def test_inspect_junk_checkpoint_prints_no_traceback(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x80\x02}q\x00")
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "could not be read" in proc.stderr


def test_inspect_bad_targets_regex_and_bad_top_k_exit_2(tmp_path, capsys):
    save_file({"w": torch.randn(4, 3)}, tmp_path / "w.safetensors")
    for args, msg in ((["--targets", "("], "not a valid regular expression"), (["--top-k", "0"], "top_k")):
        assert main(["inspect", str(tmp_path / "w.safetensors"), *args]) == 2
        assert msg in capsys.readouterr().err


def test_inspect_unwritable_out_fails_before_printing_the_table(tmp_path, capsys):
    save_file({"w": torch.randn(4, 3)}, tmp_path / "w.safetensors")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["inspect", str(tmp_path / "w.safetensors"), "--out", str(blocker / "rep")]) == 2
    out = capsys.readouterr()
    assert "cannot write the report" in out.err and "stable rank" not in out.out


def test_main_called_as_a_function_leaves_the_environment_unchanged(monkeypatch, capsys):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert main(["reproduce", "--list"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ


def test_reproduce_records_the_command_and_commit_in_the_report(tmp_path, capsys):
    assert main(["reproduce", "dmf-invariance", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dmf-invariance.json").read_text())
    assert data["environment"]["command"] == f"torchlowrank reproduce dmf-invariance --quick --out {tmp_path}"
    assert data["environment"]["git_commit"] is None or len(data["environment"]["git_commit"]) >= 40
    assert "git_commit" in data["environment"]
    assert (
        "Provenance: produced by `torchlowrank reproduce dmf-invariance --quick"
        in (tmp_path / "dmf-invariance.md").read_text()
    )
