"""Mount command lines recognised without argparse or any import: which ones go to the
mount server (cli/entry.py), and the arguments of a plain one (cli/main.py)."""

# `fusesnap-overlay` flags and options that keep it in the foreground or do not mount
_OVERLAY_LOCAL_FLAGS = {"-f", "-d", "--debug", "-h", "--help", "-V", "--version"}


def overlay_daemonizes(argv: list[str]) -> bool:
    """Whether a `fusesnap-overlay` command line mounts and daemonizes (no -f, -d,
    help or version, no `debug` option)."""
    if any(a in _OVERLAY_LOCAL_FLAGS for a in argv) or not argv:
        return False
    for i, a in enumerate(argv):
        opts = argv[i + 1] if a == "-o" and i + 1 < len(argv) else a[2:] if a.startswith("-o") else ""
        if "debug" in opts.split(","):
            return False
    return True


def helper_source(argv: list[str]) -> list[str]:
    """mount.fuse3 runs `fusesnap SOURCE TARGET -o OPTS`; mount(8) turns the SOURCE
    `fusesnap` into an absolute path when its cwd holds a file of that name: read
    such a path as the helper form's `fusesnap` again."""
    for i, a in enumerate(argv):
        if a == "--root":
            continue
        if not a.startswith("-") and (i == 0 or argv[i - 1] != "--root"):
            if a.startswith("/") and a.rsplit("/", 1)[1] == "fusesnap":
                return argv[:i] + ["fusesnap"] + argv[i + 1:]
            return argv
    return argv


_GLOBAL_FLAGS = {"-v": 1, "-vv": 2, "-vvv": 3, "--verbose": 1}


def plain_mount_args(argv: list[str]) -> dict[str, object] | None:
    """The arguments of a plain mount command line, without argparse or any import:
    `fusesnap [--root R] [-v] [--json] mount KEY MP [-o OPT]... [--json]` or the
    mount.fuse3 helper form `fusesnap ... fusesnap TARGET [-o OPTS]...`. Anything
    else (-f, --help, abbreviations, a missing or extra argument) returns None and
    goes through argparse as usual. cli.main._namespace() of the result equals
    what build_parser() gives."""
    root, verbose, json_out = None, 0, False
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if a == "--root" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            root, i = argv[i + 1], i + 2
        elif a.startswith("--root=") and len(a) > 7:
            root, i = a[7:], i + 1
        elif a in _GLOBAL_FLAGS:
            verbose, i = verbose + _GLOBAL_FLAGS[a], i + 1
        elif a == "--json":
            json_out, i = True, i + 1
        else:
            return None
    if i >= len(argv) or argv[i] not in ("mount", "fusesnap"):
        return None
    command, rest = argv[i], argv[i + 1:]
    positional: list[str] = []
    options: list[str] = []
    j = 0
    while j < len(rest):
        a = rest[j]
        if a == "-o" and j + 1 < len(rest) and not rest[j + 1].startswith("-"):
            options.append(rest[j + 1])
            j += 2
            continue
        if a.startswith("-o") and len(a) > 2 and a[2] not in "=-":
            options.append(a[2:])
        elif a == "--json":
            json_out = True
        elif a.startswith("-"):
            return None           # -f, --help, anything argparse must judge
        else:
            positional.append(a)
        j += 1
    if (command, len(positional)) not in (("mount", 2), ("fusesnap", 1)):
        return None
    return {"root": root, "verbose": verbose, "json": json_out, "command": command,
            "positional": positional, "options": options}
