"""The console scripts' entry points: a mount that daemonizes goes to the mount server.

`fusesnap` and `fusesnap-overlay` start here. A command line that mounts and
then daemonizes (`fusesnap mount KEY MP`, the mount.fuse3 helper form,
`fusesnap-overlay -o ... MP`) is handed to the mount server
(cli/mountclient.py), which runs it in a worker that has everything imported;
anything else, or a mount the server could not take, runs in this process as
before. This module imports nothing but the client (measured with `python -X
importtime`: `fusesnap.cli.main` alone pulls in typing and re, ~6 ms), so the
heavy imports below sit inside the functions on purpose.
"""

import os
import sys

from fusesnap.cli.mountargs import helper_source, overlay_daemonizes, plain_mount_args


def fusesnap() -> None:
    """`fusesnap`."""
    argv = helper_source(sys.argv[1:])
    if plain_mount_args(argv) is not None:
        _through_server("fusesnap", argv)
    from fusesnap.cli.main import main

    sys.exit(main())


def overlay() -> None:
    """`fusesnap-overlay`."""
    argv = sys.argv[1:]
    if overlay_daemonizes(argv):
        _through_server("fusesnap-overlay", argv)
    from fusesnap.cli.overlay import main

    sys.exit(main())


def _through_server(kind: str, argv: list[str]) -> None:
    """Exit with the server's exit status, or return when it did not take the command."""
    from fusesnap.cli import mountclient

    rc = mountclient.run(kind, argv)
    if rc is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
