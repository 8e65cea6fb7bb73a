"""How much compareTo sends, against how much was written: a 1 GiB disk file with data on a
loop-mounted XFS (reflink) and btrfs, snapshot, N random 4 KiB writes, snapshot; bytes that
diff_chunks reports / bytes written, beside the Go service's method (report every new extent
record (start, length, physical) absent from the old map), with the old map read now and as
stored at snapshot time. Needs root. Run from the repo root: python3 bench/bench_precision.py
Options: --fs xfs,btrfs  --size-mib 1024  --writes 100,1000,10000"""
from __future__ import print_function

import os
import random
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import ovm_exporter as ox  # noqa: E402
from harness import LoopMount, option  # noqa: E402

MIB = 1024 * 1024
BLOCK = 4096


def go_bytes(old, new, size):
    known = set((e[0], e[1], e[2]) for e in old)
    total = 0
    for lo, ln, ph, fl in new:
        if fl & ox.FIEMAP_EXTENT_UNWRITTEN or lo >= size:
            continue
        if (lo, ln, ph) not in known:
            total += min(ln, size - lo)
    return total


def fill(path, size, seed):
    rnd = random.Random(seed)
    pattern = bytes(bytearray(rnd.getrandbits(8) for _ in range(MIB)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for k in range(size // MIB):
            os.write(fd, pattern[k % 4096:] + pattern[:k % 4096])
        os.fsync(fd)
    finally:
        os.close(fd)


def scenario(mnt, live, size, writes, rnd, label):
    snap_a = os.path.join(mnt, 'snap-a')
    snap_b = os.path.join(mnt, 'snap-b')
    ox.clone_file(live, snap_a)
    stored_a = ox.file_extents(snap_a)[0]
    blocks = set()
    fd = os.open(live, os.O_WRONLY)
    try:
        if label == 'random 4 KiB':
            for _ in range(writes):
                b = rnd.randrange(size // BLOCK)
                blocks.add(b)
                os.lseek(fd, b * BLOCK, os.SEEK_SET)
                os.write(fd, os.urandom(BLOCK))
        else:   # 1 MiB sequential runs at random places
            for _ in range(writes):
                b = rnd.randrange(size // MIB) * (MIB // BLOCK)
                blocks.update(range(b, b + MIB // BLOCK))
                os.lseek(fd, b * BLOCK, os.SEEK_SET)
                os.write(fd, os.urandom(MIB))
        os.fsync(fd)
    finally:
        os.close(fd)
    ox.clone_file(live, snap_b)
    ext_a, size_a = ox.file_extents(snap_a)
    ext_b, size_b = ox.file_extents(snap_b)
    chunks = ox.diff_chunks(ext_a, ext_b, size_b, size_a)
    ours = sum(c['length'] for c in chunks)
    written = len(blocks) * BLOCK
    # every written block must be in the answer
    covered = set()
    for c in chunks:
        covered.update(range(c['start'] // BLOCK, (c['start'] + c['length'] + BLOCK - 1) //
                             BLOCK))
    assert blocks <= covered, 'diff_chunks missed written blocks'
    row = (label, writes, len(stored_a), len(ext_a), len(ext_b), written / float(MIB),
           ours / float(MIB), ours / float(written),
           go_bytes(ext_a, ext_b, size_b) / float(written),
           go_bytes(stored_a, ext_b, size_b) / float(written))
    os.unlink(snap_a)
    os.unlink(snap_b)
    return row


def bench_fs(fs, size, writes_list):
    base = tempfile.mkdtemp(prefix='bench-precision-')
    mounted = None
    try:
        mkfs = (['mkfs.xfs', '-q', '-f', '-m', 'reflink=1'] if fs == 'xfs'
                else ['mkfs.btrfs', '-q', '-f'])
        mounted = LoopMount(base, mkfs, 2 * size + 512 * MIB)
        mnt = mounted.path
        live = os.path.join(mnt, 'disk.img')
        fill(live, size, 1)
        rnd = random.Random(2)
        print('\n{0}: {1} MiB disk; ratio = bytes reported / bytes written (1.00 is exact)'
              .format(fs, size // MIB))
        print('{0:>13} {1:>6} {2:>18} {3:>9} {4:>9} {5:>7} {6:>9} {7:>12}'.format(
            'writes', 'N', 'extents old*/old/new', 'MiB wrtn', 'MiB ours', 'ours',
            'Go (now)', 'Go (stored)'))
        for label, writes in ([('random 4 KiB', n) for n in writes_list] +
                              [('1 MiB runs', 16)]):
            row = scenario(mnt, live, size, writes, rnd, label)
            print('{0:>13} {1:>6} {2:>18} {3:>9.2f} {4:>9.2f} {5:>6.2f}x {6:>8.1f}x '
                  '{7:>11.1f}x'.format(row[0], row[1], '{0}/{1}/{2}'.format(*row[2:5]),
                                       *row[5:]))
    finally:
        if mounted:
            mounted.close()
        shutil.rmtree(base, ignore_errors=True)


def main():
    if os.geteuid() != 0:
        print('bench_precision: needs root (loop-mounted XFS/btrfs); nothing measured')
        return
    size = int(option('--size-mib', '1024')) * MIB
    writes = [int(x) for x in option('--writes', '100,1000,10000').split(',')]
    for fs in option('--fs', 'xfs,btrfs').split(','):
        bench_fs(fs, size, writes)
    print('\n* old*: extent records of the older snapshot as stored when it was made (Go kept '
          'those); old/new: read now. Go (now)/(stored): the Go method on those maps.')


main()
