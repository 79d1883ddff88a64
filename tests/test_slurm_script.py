"""Site files, wall times and batch-script text: pure functions, no Slurm needed."""

from __future__ import annotations

import io
import json
import subprocess

import pytest

from pilot.cli import main
from pilot.errors import UserError
from pilot.slurm import (SITES_DIR, JobOptions, format_walltime, launch_line, load_site, parse_walltime,
                         resolve_site)
from pilot.slurm_jobs import chain_jobs, read_chain
from pilot.slurm_script import render_script, sbatch_directives, signal_margin

SHIPPED = ("cori-knl", "csd3-cclake", "csd3-icelake", "generic", "local")


def site_text(**overrides) -> str:
    data = {"cores_per_node": 8, "memory_per_node_mb": 16000, "launch": "srun --ntasks={ranks}"}
    data.update(overrides)
    return json.dumps(data)


def options(**overrides) -> JobOptions:
    values = dict(workflow="/data/wf.yaml", run_dir="/scratch/run", checkpoint="/scratch/run/checkpoint.h5",
                  nodes=4, walltime_s=3600, max_jobs=3, drain_margin=300, job_name="pilot-wf")
    values.update(overrides)
    return JobOptions(**values)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sites_load(name):
    site = resolve_site(name)
    assert site.name == name
    assert site.cores_per_node > 0 and site.memory_per_node_mb > 0
    assert launch_line(site, 3)   # every field it uses is known


def test_site_values_match_the_machines():
    knl, cclake, icelake = (resolve_site(n) for n in ("cori-knl", "csd3-cclake", "csd3-icelake"))
    assert (knl.constraint, knl.exclusive, knl.cores_per_node) == ("knl", True, 68)
    assert knl.memory_per_node_mb <= 96 * 1024
    assert (cclake.partition, cclake.cores_per_node, cclake.memory_per_node_mb) == ("cclake", 56, 56 * 3420)
    assert (icelake.partition, icelake.cores_per_node, icelake.memory_per_node_mb) == ("icelake", 76, 76 * 3380)
    assert "setup lsst_distrib" in knl.setup and "export OMP_NUM_THREADS=1" in cclake.setup


def test_site_by_path_and_unknown_name():
    assert resolve_site(str(SITES_DIR / "local.yaml")).name == "local"
    with pytest.raises(UserError, match="not a shipped site"):
        resolve_site("nowhere")


@pytest.mark.parametrize("text, message", [
    ("cores_per_node: [1,\n", "line"),
    ("- a list\n", "mapping"),
    (site_text(colour="blue"), "unknown key 'colour'"),
    (json.dumps({"cores_per_node": 8, "launch": "srun"}), "missing required key 'memory_per_node_mb'"),
    (site_text(cores_per_node="many"), "cores_per_node must be an integer"),
    (site_text(cores_per_node=True), "cores_per_node must be an integer"),
    (site_text(memory_per_node_mb=0), "memory_per_node_mb must be positive"),
    (site_text(exclusive="yes"), "exclusive must be true or false"),
    (site_text(setup="module load x"), "setup must be a list"),
    (site_text(setup=["ok", 3]), "every entry of setup"),
    (site_text(launch="srun -n {tasks}"), "launch uses {tasks}"),
    (site_text(launch="srun -n {ranks"), "launch:"),
    (site_text(drain_margin=-1), "drain_margin must not be negative"),
    (site_text(agents_per_node=0), "agents_per_node must be between 1 and cores_per_node"),
    (site_text(agents_per_node=9), "agents_per_node must be between 1 and cores_per_node .8., got 9"),
])
def test_bad_site_is_one_line_user_error(text, message):
    with pytest.raises(UserError, match=message) as err:
        load_site(io.StringIO(text), "bad.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("bad.yaml:")


def test_numeric_account_becomes_text():
    assert load_site(io.StringIO(site_text(account=1727)), "s.yaml").account == "1727"


@pytest.mark.parametrize("text, seconds", [
    ("00:01:00", 60), ("12:00:00", 43200), ("1-02:03:04", 93784), ("48:00", 172800), ("0:30:5", 1805)])
def test_parse_walltime(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("text", ["90", "00:00:00", "1:75:00", "1:00:99", "one hour", "-1:00:00"])
def test_parse_walltime_rejects(text):
    with pytest.raises(UserError, match="--walltime"):
        parse_walltime(text)


def test_format_walltime():
    assert format_walltime(93784) == "1-02:03:04"
    assert format_walltime(60) == "0-00:01:00"


@pytest.mark.parametrize("overrides, message", [
    ({"nodes": 0}, "--nodes"), ({"max_jobs": 0}, "--resubmit"), ({"drain_margin": 3600}, "--drain-margin")])
def test_job_options_check(overrides, message):
    with pytest.raises(UserError, match=message):
        options(**overrides).check()


def test_directives_follow_site():
    site = resolve_site("cori-knl")
    lines = sbatch_directives(site, options())
    assert "#SBATCH --constraint=knl" in lines and "#SBATCH --qos=regular" in lines
    assert "#SBATCH --exclusive" in lines and "#SBATCH --nodes=4" in lines
    assert "#SBATCH --time=0-01:00:00" in lines and f"#SBATCH --mem={site.memory_per_node_mb}" in lines
    assert "#SBATCH --signal=B:USR1@150" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --licenses=cscratch1" in lines
    assert not any(line.startswith("#SBATCH --account") for line in lines)   # null: left out
    assert not any(line.startswith("#SBATCH --partition") for line in lines)


def test_directives_with_account_and_no_exclusive():
    site = load_site(io.StringIO(site_text(account="proj-SL2-CPU", partition="icelake", exclusive=False)))
    lines = sbatch_directives(site, options())
    assert "#SBATCH --account=proj-SL2-CPU" in lines and "#SBATCH --partition=icelake" in lines
    assert "#SBATCH --exclusive" not in lines


def test_signal_margin_is_half_the_drain_margin():
    assert signal_margin(300) == 150 and signal_margin(45) == 22 and signal_margin(0) == 1


def test_script_launches_one_agent_per_node_plus_master():
    text = render_script(resolve_site("csd3-icelake"), options(nodes=6))
    assert "srun --mpi=pmi2 --kill-on-bad-exit=1 --cpu-bind=none --nodes=6 --ntasks=7 bash -c" in text
    assert 'pilot run "$WORKFLOW" --checkpoint "$CHECKPOINT" --node-cores 76' in text
    assert "source \"$LSST_STACK/loadLSST.bash\"\nsetup lsst_distrib\nexport OMP_NUM_THREADS=1" in text
    assert text.index("setup lsst_distrib") < text.index("srun --mpi")
    assert "MAX_JOBS=3" in text and "DRAIN_MARGIN=300" in text
    assert 'sbatch --parsable --dependency="afterany:$SLURM_JOB_ID" "$RUN_DIR/job.sh"' in text


def test_script_quotes_paths_and_run_args():
    text = render_script(resolve_site("local"), options(
        workflow="/data/my wf.yaml", run_dir="/scratch/a b", checkpoint="/scratch/a b/c.h5",
        run_args=("--max-failures", "5", "--log-dir", "/x y")))
    assert "WORKFLOW='/data/my wf.yaml'" in text and "RUN_DIR='/scratch/a b'" in text
    assert "#SBATCH '--chdir=/scratch/a b'" in text
    assert "--node-cores 2 --max-failures 5 --log-dir '/x y' \"${walltime[@]}\"" in text


@pytest.mark.parametrize("name", SHIPPED)
def test_script_is_valid_bash(name, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(render_script(resolve_site(name), options()))
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert script.read_text().startswith("#!/bin/bash\n")


def test_chain_record_reading(tmp_path):
    (tmp_path / "chain.jsonl").write_text(
        '{"event": "submit", "job": "7", "index": 1}\n'
        '{"event": "end", "job": "7", "index": 1, "exit": 3, "next": "8"}\n'
        '{"event": "start", "job": "8", "ind')   # torn last line
    records = read_chain(tmp_path)
    assert [r["event"] for r in records] == ["submit", "end"]
    assert chain_jobs(records) == ["7", "8"]
    assert read_chain(tmp_path / "missing") == []


def workflow_file(tmp_path, memory=100):
    path = tmp_path / "wf.yaml"
    path.write_text(f"requestMemory: {memory}\ntasks:\n  - {{id: a, command: 'true'}}\n")
    return path


def test_cli_dry_run_prints_script(tmp_path, capsys):
    code = main(["submit", str(workflow_file(tmp_path)), "--site", "local", "--nodes", "2",
                 "--walltime", "00:10:00", "--run-dir", str(tmp_path / "run"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in out and "--ntasks=3" in out
    assert not (tmp_path / "run").exists()   # nothing written, nothing submitted


@pytest.mark.parametrize("site_body, message", [
    ("cores_per_node: 2\nmemory_per_node_mb: 100\nlaunch: srun\nqueue: x\n", "unknown key 'queue'"),
    ("cores_per_node: 2\n", "missing required key"),
])
def test_cli_bad_site_exits_2_with_one_line(tmp_path, capsys, site_body, message):
    site = tmp_path / "site.yaml"
    site.write_text(site_body)
    code = main(["submit", str(workflow_file(tmp_path)), "--site", str(site), "--nodes", "1",
                 "--walltime", "01:00:00", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and err.startswith("pilot: error: ")


def test_cli_refuses_task_bigger_than_a_node(tmp_path, capsys):
    code = main(["submit", str(workflow_file(tmp_path, memory=1900)), "--site", "local", "--nodes", "4",
                 "--walltime", "00:10:00", "--dry-run"])
    assert code == 2 and "more than the largest node" in capsys.readouterr().err


def test_cli_cancel_needs_a_run_dir(tmp_path, capsys):
    assert main(["cancel", str(tmp_path)]) == 2
    assert "not a pilot run directory" in capsys.readouterr().err


def test_agents_per_node_sets_the_ranks_of_the_launch():
    one = load_site(io.StringIO(site_text(launch="srun --nodes={nodes} --ntasks={ranks}")), "s.yaml")
    two = load_site(io.StringIO(site_text(launch="srun --nodes={nodes} --ntasks={ranks}", agents_per_node=2)),
                    "s.yaml")
    assert launch_line(one, 3) == "srun --nodes=3 --ntasks=4"
    assert launch_line(two, 3) == "srun --nodes=3 --ntasks=7"   # two agents a node, the master beside them
