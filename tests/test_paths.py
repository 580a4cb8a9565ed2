"""Issue 24: paths and names -- experiment folders, symlink loops, long names, and the Makefile's quoting."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from commandline import ROOT, cli, one_line_error

from metaqnn.exp_path import PathError, check_experiment_dir, resolved_path

LONG = "x" * 300  # over NAME_MAX (255)


# --- which folders search may turn into an experiment --------------------------------------------


def test_an_experiment_folder_is_new_empty_or_already_an_experiment(tmp_path):
    assert check_experiment_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_experiment_dir(empty) == empty
    exp = tmp_path / "exp"
    (exp / "models" / "00001").mkdir(parents=True)
    (exp / "store.sqlite").write_bytes(b"SQLite format 3\x00")  # the store itself checks the rest
    (exp / "notes.txt").write_text("mine")  # an experiment may hold what its owner put there
    assert check_experiment_dir(exp) == exp
    killed = tmp_path / "killed"  # a search killed while creating its store
    killed.mkdir()
    (killed / "store.sqlite.lock").write_text("pid 1")
    assert check_experiment_dir(killed) == killed


@pytest.mark.parametrize("content", ["notes.txt", "models/", "store.sqlite.bak"])
def test_a_folder_that_is_not_an_experiment_is_refused(tmp_path, content):
    folder = tmp_path / "f"
    folder.mkdir()
    if content.endswith("/"):
        (folder / content.rstrip("/")).mkdir()  # models/ without a store: a fresh search would reuse its folders
    else:
        (folder / content).write_text("x")
    with pytest.raises(PathError, match="is a folder that is not empty and holds no experiment"):
        check_experiment_dir(folder)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(PathError, match="is not a folder"):
        check_experiment_dir(file)


@pytest.mark.slow  # runs the command line in subprocesses
def test_search_writes_nothing_into_a_folder_that_is_not_an_experiment(tmp_path):
    """`--exp ../../etc` from inside a checkout: the folder exists, holds files and no store."""
    target = tmp_path / "etc"
    target.mkdir()
    (target / "passwd").write_text("root:x:0:0\n")
    rel = os.path.relpath(target, ROOT)  # ../../.../etc, as the user typed it
    line = one_line_error(cli("search", "--exp", rel, "--max-models", "1"), "holds no experiment")
    assert str(target) in line and "passwd" in line
    assert sorted(os.listdir(target)) == ["passwd"]  # no store.sqlite, no lock, no models/


@pytest.mark.slow  # runs the command line in subprocesses
@pytest.mark.parametrize("command", ["status", "export", "report", "finetune", "ensemble", "finish"])
def test_read_only_commands_on_a_folder_that_is_not_an_experiment(tmp_path, command):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    one_line_error(cli(command, "--exp", str(folder)), "no experiment store at")
    assert sorted(os.listdir(folder)) == ["notes.txt"]


# --- symlink loops and long names: one line, never a traceback ----------------------------------


def test_a_symlink_loop_is_named(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for path in (loop, loop / "below"):
        with pytest.raises(PathError, match=r"--data-dir .*a symbolic link loop"):
            resolved_path(path, "--data-dir")
    with pytest.raises(PathError, match="longer than 255 bytes"):
        resolved_path(tmp_path / LONG, "--out")
    with pytest.raises(PathError, match="is empty"):
        resolved_path("", "--out")
    assert resolved_path(tmp_path / "a" / ".." / "b", "--out") == tmp_path / "b"


def _loop_cases():
    return [
        ("search", "--exp", "{loop}"),
        ("search", "--exp", "{tmp}/e", "--data-dir", "{loop}"),
        ("search", "--exp", "{tmp}/e", "--source", "{loop}"),
        ("status", "--exp", "{loop}"),
        ("export", "--exp", "{loop}"),
        ("report", "--exp", "{loop}"),
        ("finetune", "--exp", "{loop}/x"),
        ("export", "--exp", "{tmp}/e", "--out", "{loop}"),
        ("report", "--exp", "{tmp}/e", "--out", "{loop}"),
        ("render", "--arch", "[SM(10)]", "--out", "{loop}"),
        ("render", "--arch", "[SM(10)]", "--out", "{tmp}/r", "--data-dir", "{loop}"),
        ("download", "--dataset", "mnist", "--dest", "{loop}"),
        ("prepare", "--data-dir", "{loop}"),
        ("prepare", "--data-dir", "{tmp}/d", "--source", "{loop}"),
        ("compare", "{loop}", "{loop}"),
        ("arch", "{loop}"),
        ("regenerate-check", "{loop}"),
    ]


@pytest.mark.slow  # runs the command line in subprocesses
@pytest.mark.parametrize("args", _loop_cases(), ids=lambda a: "-".join(x for x in a if "{" not in x))
def test_a_symlink_loop_as_a_path_option_is_one_line(tmp_path, args):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv = [a.format(loop=loop, tmp=tmp_path) for a in args]
    one_line_error(cli(*argv), "a symbolic link loop")
    assert sorted(os.listdir(tmp_path)) == ["loop"]  # nothing created


@pytest.mark.slow  # runs the command line in subprocesses
@pytest.mark.parametrize(
    "args",
    [
        ("search", "--exp", LONG),  # a name: experiments/<300 x>
        ("status", "--exp", LONG),
        ("search", "--exp", "{tmp}/" + LONG),
        ("search", "--exp", "{tmp}/e", "--data-dir", "{tmp}/" + LONG),
        ("render", "--arch", "[SM(10)]", "--out", "{tmp}/" + LONG),
        ("download", "--dataset", "mnist", "--dest", "{tmp}/" + LONG + "/x"),
        ("arch", "{tmp}/" + LONG),
    ],
    ids=lambda a: "-".join(x[:12] for x in a if "{" not in x),
)
def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, args):
    argv = [a.format(tmp=tmp_path) for a in args]
    one_line_error(cli(*argv), "is longer than 255 bytes")
    assert not os.listdir(tmp_path)


# --- the Makefile: every user value is one quoted word ------------------------------------------


def _make(*args: str, dry: bool = True) -> "subprocess.CompletedProcess[str]":
    if shutil.which("make") is None:
        pytest.fail("make is needed to test the Makefile")
    # -o: never (re)build the virtualenv here; PY: the interpreter running these tests
    cmd = ["make", "-s", "-o", ".venv/.installed", f"PY={sys.executable}", *(["-n"] if dry else []), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_make_quotes_every_value_it_hands_to_the_shell():
    out = _make(
        "search",
        "EXP=my exp;echo X",
        "DATASET=digits",
        "GPUS=0,1",
        "WORKERS=2",
        "RAY=h:1",
        "SOURCE=it's here",
        "SET=a.b=1 c.d='x y'",
    ).stdout
    line = next(ln for ln in out.splitlines() if "metaqnn search" in ln)
    assert "--exp 'my exp;echo X'" in line
    assert "--gpus '0,1'" in line and "--workers '2'" in line and "--ray 'h:1'" in line
    assert "--source 'it'\\''s here'" in line
    assert "--set 'a.b=1' --set 'c.d='\\''x' --set 'y'\\'''" in line  # split on spaces, each item quoted
    for target, args, want in [
        ("status", ["EXP=a b"], "status --exp 'a b'"),
        ("status", ["DATASET=a;b"], "status --exp 'a;b'"),
        ("export", ["EXP=e", "TOP=3;x"], "export --exp 'e' --top '3;x'"),
        ("finish", ["EXP=e", "FINISH_TOP=$$(x)"], "finish --exp 'e' --top '$(x)'"),
        ("compare", ["A=a b", "B=c"], "compare 'a b' 'c'"),
        ("arch", ["FILE=f;g"], "arch 'f;g'"),
        ("regenerate-check", ["FILE=f g", "PROTOCOL_SET=base_lr=1 x=2"], "'f g' --dataset 'digits' --protocol-set"),
    ]:
        assert want in _make(target, *args).stdout, (target, args)


@pytest.mark.slow  # runs the command line in subprocesses
def test_make_runs_no_command_hidden_in_a_value():
    result = _make("status", "EXP=a;echo INJECTED", dry=False)
    lines = result.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "no experiment store" in errors[0] and "a;echo INJECTED" in errors[0], result.stderr
    # make's own 'Error 2' only ("make[1]: ..." when the tests themselves run under make, as in CI)
    assert all(ln.startswith("error: ") or re.match(r"make(\[\d+\])?: ", ln) for ln in lines), result.stderr
    assert "INJECTED" not in result.stdout.replace("a;echo INJECTED", "")
    assert result.returncode != 0
    spaced = _make("status", "EXP=my exp", dry=False)
    errors = [ln for ln in spaced.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "no experiment store" in errors[0] and "my exp" in errors[0], spaced.stderr
    assert not (Path(ROOT) / "experiments" / "my exp").exists()
