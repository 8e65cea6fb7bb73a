"""How long a VM's Xen domain stays paused while its disks are cloned (`paused_ms`): 3 sparse
disks of 1 GiB with 10,000 data extents each on a loop-mounted XFS (reflink), snapshots taken by
SnapshotService.create_snapshot with snapshot_pause = "always" and a stand-in `xl` whose domain
is a `sleep` process (pause = SIGSTOP and wait until stopped, unpause = SIGCONT). Beside it, the
same clones without a pause. Needs root. Run from the repo root: python3 bench/bench_pause.py
Options: --disks 3  --size-mib 1024  --extents 10000  --rounds 10  --dir DIR (an existing
reflink-capable folder, e.g. an OCFS2 repository, instead of a new XFS loop mount)"""
from __future__ import print_function

import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import ovm_exporter as ox  # noqa: E402
from harness import LoopMount, median, option  # noqa: E402

MIB = 1024 * 1024
VM = '0004fb00000600000000000000000b01'
STAND_IN_XL = r'''#!/bin/sh
pid=$(cat "$(dirname "$0")/domain.pid")
case "$1" in
list) kill -0 "$pid" ;;
pause) kill -STOP "$pid" && while [ "$(cut -d' ' -f3 /proc/$pid/stat)" != T ]; do :; done ;;
unpause) kill -CONT "$pid" ;;
esac
'''


def filesystem_type(path):
    """The type of the mounted filesystem holding `path`: a repository must name it."""
    entry = ox._mount_containing(os.path.realpath(path), ox.read_mount_table())
    return entry[1]


def make_disk(path, size, extents):
    step = (size // extents) // 4096 * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        block = os.urandom(4096)
        for k in range(extents):
            os.lseek(fd, k * step, os.SEEK_SET)
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)


def main():
    disks = int(option('--disks', '3'))
    size = int(option('--size-mib', '1024')) * MIB
    extents = int(option('--extents', '10000'))
    rounds = int(option('--rounds', '10'))
    work = tempfile.mkdtemp(prefix='bench-pause-')
    mounted = None
    domain = None
    try:
        base = option('--dir', None)
        if base is None:
            mounted = LoopMount(work, ['mkfs.xfs', '-q', '-m', 'reflink=1'],
                                '%dM' % (disks * size // MIB + 1024))
            base = mounted.path
        repo = os.path.join(base, 'bench-pause-repo')
        for sub in ('VirtualDisks', 'VirtualMachines/' + VM):
            os.makedirs(os.path.join(repo, sub))
        paths = []
        for index in range(disks):
            path = os.path.join(repo, 'VirtualDisks', 'disk%d.img' % index)
            make_disk(path, size, extents)
            paths.append(path)
        with open(os.path.join(repo, 'VirtualMachines', VM, 'vm.cfg'), 'w') as handle:
            handle.write("name = '%s'\nuuid = '%s'\nOVM_simple_name = 'bench'\ndisk = %r\n" % (
                VM, '0004fb00-0006-0000-0000-000000000b01',
                ['file:%s,xvd%s,w' % (p, 'abcdefgh'[i]) for i, p in enumerate(paths)]))
        xl = os.path.join(work, 'xl')
        with open(xl, 'w') as handle:
            handle.write(STAND_IN_XL)
        os.chmod(xl, 0o755)
        domain = subprocess.Popen(['sleep', '3600'])
        with open(os.path.join(work, 'domain.pid'), 'w') as handle:
            handle.write('%d\n' % domain.pid)
        found = ox.file_extents(paths[0])[0]
        print('%d disks of %d MiB, %d extents each (%s), Python %s' % (
            disks, size // MIB, len(found), base, sys.version.split()[0]))
        for mode in ('always', 'never'):
            values = dict((k, d) for k, kind, d in ox.CONFIG_SCHEMA)
            values.update({'db_file': os.path.join(work, 'state-%s.db' % mode),
                           'snapshot_pause': mode, 'xen_toolstack': xl,
                           'repository': [{'id': 'bench', 'mount_point': repo,
                                           'filesystem': filesystem_type(repo)}]})
            config = ox.Config(values)
            service = ox.build_application(config)[1]
            pauses, totals = [], []
            for _ in range(rounds):
                started = time.time()
                snapshot = service.create_snapshot(VM)
                totals.append((time.time() - started) * 1000)
                pauses.append(snapshot.get('paused_ms'))
                service.delete_snapshot(VM, snapshot['id'])
            service.store.close()
            if mode == 'always':
                print('paused_ms (snapshot_pause = "always"): median %d, max %d, min %d over %d '
                      'snapshots; whole create %.0f ms median' % (
                          median(pauses), max(pauses), min(pauses), rounds, median(totals)))
            else:
                print('same snapshot without pausing ("never"): whole create %.0f ms median'
                      % median(totals))
    finally:
        if domain is not None:
            domain.kill()
            domain.wait()
        if mounted:
            mounted.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
