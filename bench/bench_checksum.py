"""Throughput of the checksum route's work (range_checksums, what
GET .../disks/{disk}/checksum runs): MB of disk per second for a fully written file (read from
the page cache, then after dropping it when run as root) and for a sparse file whose holes are
hashed as zeros without being read; with and without block_size. Runs on Python 2.6 to 3.x.
Run from the repo root: python3 bench/bench_checksum.py   (or /path/to/python2.6 ...)
Options: --size-mib 1024  --dir DIR (default: a new folder in /var/tmp)"""
from __future__ import print_function

import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import ovm_exporter as ox  # noqa: E402
from harness import option  # noqa: E402

MIB = 1024 * 1024


def drop_caches():
    try:
        with open('/proc/sys/vm/drop_caches', 'w') as handle:
            handle.write('1\n')
        return True
    except (IOError, OSError):
        return False


def measure(path, block_size, label):
    size = os.path.getsize(path)
    with open(path, 'rb') as handle:
        started = time.time()
        extents = ox.fiemap(handle)
        ox.range_checksums(handle, extents, size, 0, size, block_size)
        seconds = time.time() - started
    print('%-44s %8.0f MB/s  (%d MiB in %.2f s)' % (
        label + (', block_size %d KiB' % (block_size // 1024) if block_size else ''),
        size / seconds / 1e6, size // MIB, seconds))


def main():
    size = int(option('--size-mib', '1024')) * MIB
    work = tempfile.mkdtemp(prefix='bench-checksum-', dir=option('--dir', '/var/tmp'))
    try:
        written = os.path.join(work, 'written.img')
        sparse = os.path.join(work, 'sparse.img')
        piece = os.urandom(MIB)
        with open(written, 'wb') as handle:
            for _ in range(size // MIB):
                handle.write(piece)
        with open(sparse, 'wb') as handle:
            handle.truncate(size)
            for offset in range(0, size, 64 * MIB):  # 1 MiB of data every 64 MiB
                handle.seek(offset)
                handle.write(piece)
        print('Python %s, %s' % (sys.version.split()[0], work))
        for block_size in (None, MIB):
            measure(written, block_size, 'written file, page cache')
            if drop_caches():
                measure(written, block_size, 'written file, cold cache')
            measure(sparse, block_size, 'sparse file (1/64 data)')
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
