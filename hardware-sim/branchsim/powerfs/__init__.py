"""The branch's power supply: a file system on which a power cut can be simulated honestly.

A process kill keeps the kernel's page cache, so it cannot show what a power cut loses. This
FUSE file system (libfuse3 through mfusepy; the model is LazyFS, github.com/dsrhaslab/lazyfs)
holds every write in memory until it is synced. On `cut` it SIGKILLs every process using the
mount, then drops everything that was not durable: what remains is exactly the synced state,
and the mount stays usable for the restart.

What is durable (strict: the least POSIX promises, less than ext4 gives):

- A file's data, size and mode: once fsync(2) or fdatasync(2) of that file returned (any
  descriptor of it). Nothing else makes data durable: not close, not rename, not sync(2) from a
  process (FUSE has no syncfs request; the control socket's `sync` does it).
- A directory entry (a name created, renamed, linked or unlinked): once fsync(2) of *that
  directory* returned. A file created, written and fsynced whose directory was never fsynced is
  gone after a cut. A rename not followed by an fsync of the directory is undone: the old name
  is back, with the old file's durable content. A new directory is empty after a cut until it
  is fsynced itself. ext4 in data=ordered mode commits names with its journal every few
  seconds, and a file's fsync commits its name too, so real cards keep more; a program correct
  here is correct there.
- A rename between two directories is two changes, one per directory: fsync of only one of them
  may leave the file under both names (or neither), which a journalling file system never does.
  Programs that need one atomic step rename within one directory.

After a cut the tree is the durable tree: names from durable entries only, each file with its
durable content. A file written but never synced comes back with its name empty (size 0) if its
name was durable. An unlinked file still open is reachable by its descriptors only; a cut puts
its old name back if that was durable.

Limits: no devices, fifos, sockets, xattrs or ACLs; POSIX and flock locks are the kernel's
(local to this machine, which is all SQLite needs). Times (atime, mtime, ctime) are kept but
only their synced values survive. `statfs` reports `capacity` (1 GiB by default) and the live
file bytes; writes past it fail with ENOSPC. Processes not killed by a cut (`cut pids ...`
naming only some) keep their descriptors: what they do afterwards acts on the reverted state,
which no real power cut allows.

SQLite in WAL mode works: its -shm file is mmapped (no direct_io, so the kernel allows shared
writable maps) and, never fsynced, is lost at a cut like on a disk; SQLite rebuilds it from the
WAL when the first connection opens the database.

Use: `python -m branchsim.powerfs MOUNTPOINT` (control.py lists the socket's commands), or
`with PowerSupply(path) as power: ... power.cut()` in Python (supply.py).
"""

from branchsim.powerfs.control import LastCut, PowerControl, PowerFsError, Stats
from branchsim.powerfs.supply import PowerSupply, fuse_unavailable
from branchsim.powerfs.volume import CutReport, Volume

__all__ = ["CutReport", "LastCut", "PowerControl", "PowerFsError", "PowerSupply", "Stats",
           "Volume", "fuse_unavailable"]
