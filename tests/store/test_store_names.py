"""Names are never overwritten silently: a layer may carry several names, a name names one layer,
and importing under a name another layer has fails clearly, also when imports race."""

from __future__ import annotations

import json
import subprocess

from helpers import script
from storeutil import fusesnap, tar_of



def test_same_content_under_a_second_name_keeps_the_first(tmp_path):
    root = tmp_path / "root"
    data = tar_of({"f": b"same" * 100})
    a = fusesnap(root, "import", "--name", "A", "-", input=data)
    b = fusesnap(root, "import", "--name", "B", "-", input=data)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    for name in ("A", "B"):
        assert fusesnap(root, "export", name).stdout == data
    info = json.loads(fusesnap(root, "--json", "inspect", "B").stdout)
    assert info["names"] == ["A", "B"] and info["labels"]["fusesnap.io/name"] == "A"
    assert b"A,B" in fusesnap(root, "layers").stdout


def test_parallel_imports_under_four_names_all_stick(tmp_path):
    root = tmp_path / "root"
    data = tar_of({f"d/{i}": bytes([i]) * 20_000 for i in range(200)})
    fusesnap(root, "layers")
    procs = [subprocess.Popen([script("fusesnap"), "--root", str(root), "import", "--name", f"big{i}", "-"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(1, 5)]
    outs = [p.communicate(data) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    chains = {o[0].split()[0] for o in outs}
    assert len(chains) == 1
    for i in range(1, 5):
        assert fusesnap(root, "export", f"big{i}").stdout == data
    (info,) = json.loads(fusesnap(root, "--json", "layers").stdout)
    assert sorted(info["names"]) == ["big1", "big2", "big3", "big4"]


def test_a_name_another_layer_has_is_refused_and_leaves_nothing(tmp_path):
    root = tmp_path / "root"
    first = tar_of({"a": b"a"})
    assert fusesnap(root, "import", "--name", "n", "-", input=first).returncode == 0
    r = fusesnap(root, "import", "--name", "n", "-", input=tar_of({"b": b"b"}))
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"name 'n' is already used by layer" in r.stderr
    assert fusesnap(root, "export", "n").stdout == first
    assert len(json.loads(fusesnap(root, "--json", "layers").stdout)) == 1
    r = fusesnap(root, "--json", "fsck")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"]


def test_named_layers_survive_gc_and_go_by_any_name(tmp_path):
    root = tmp_path / "root"
    data = tar_of({"x": b"x"})
    fusesnap(root, "import", "--name", "one", "--label", "fusesnap.io/gc.root=", "-", input=data)
    fusesnap(root, "import", "--name", "two", "-", input=data)
    assert fusesnap(root, "gc").stdout == b""
    assert fusesnap(root, "rm", "two").returncode == 0
    assert fusesnap(root, "export", "one").returncode == 1
