"""Concurrent clients on one store: each runs random CLI operations on its own names (imports,
prepares with changes, commits, removes, exports it verifies) while gc, listings and the other
clients run beside it. No operation may fail: every name is the client's own, and gc must
never take what a name, a snapshot or a child keeps."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .common import Cli, Model, StressFailure, one_line_error, random_tar, run_all, run_until, sha, write_upper


class _Client:
    def __init__(self, cli: Cli, c: int, seed: int) -> None:
        self.cli = cli
        self.prefix = f"w{c}-"
        self.rnd = random.Random(seed)
        self.model = Model()
        self.ops = 0
        self.error: str | None = None
        self._n = 0

    def name(self, kind: str) -> str:
        self._n += 1
        return f"{self.prefix}{kind}{self._n}"

    def must(self, *args: str, input: bytes | None = None) -> bytes:
        r = self.cli.run(*args, input=input)
        one_line_error(r, " ".join(args))
        if r.returncode != 0:
            raise StressFailure(f"client {self.prefix}: `fusesnap {' '.join(args)}`: {r.stderr.decode().strip()}")
        return r.stdout

    def step(self) -> None:
        r, m = self.rnd, self.model
        op = r.choices(("import", "prepare", "commit", "remove", "gc", "list", "export"),
                       (20, 20, 20, 15, 10, 7, 8))[0]
        if op == "import":
            data = random_tar(r, r.choice((5, 40)))
            out = self.must("import", "--name", self.name("i"), "-", input=data)
            m.layers[out.split()[0].decode()] = sha(data)
        elif op == "prepare":
            key = self.name("k")
            self.must("prepare", key, r.choice([""] + sorted(m.layers)))
            (mount,) = json.loads(self.must("mounts", key))
            upper = Path(next(o for o in mount["options"] if o.startswith("upperdir="))[9:])
            write_upper(r, upper, r.choice((1, 10)))
            m.actives[key] = sha(self.must("diff", key))
        elif op == "commit" and m.actives:
            key = r.choice(sorted(m.actives))
            name = self.name("c")
            self.must("commit", name, key)
            m.commits[name] = m.actives.pop(key)
        elif op == "remove" and (m.actives or m.commits):
            key = r.choice(sorted(m.actives) + sorted(m.commits))
            self.must("remove", key)
            m.actives.pop(key, None)
            m.commits.pop(key, None)
        elif op == "gc":
            self.must("gc")
        elif op == "list":
            json.loads(self.must("--json", "list"))
            json.loads(self.must("--json", "layers"))
        elif op == "export" and (m.layers or m.commits):
            ref = r.choice(sorted(m.layers) + sorted(m.commits))
            want = m.layers.get(ref) or m.commits[ref]
            if sha(self.must("export", ref)) != want:
                raise StressFailure(f"client {self.prefix}: export {ref} differs from what was stored")
        else:
            return
        self.ops += 1

    def run(self, deadline: float) -> None:
        self.error = run_until(deadline, self.step)


def clients(cli: Cli, rnd: random.Random, n: int, seconds: float, model: Model) -> int:
    workers = [_Client(cli, c, rnd.getrandbits(64)) for c in range(n)]
    run_all(workers, seconds)
    for w in workers:
        model.layers.update(w.model.layers)
        model.commits.update(w.model.commits)
        model.actives.update(w.model.actives)
    model.verify(cli.root, "after the concurrent clients")
    return sum(w.ops for w in workers)
