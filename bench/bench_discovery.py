"""Benchmark of HostInventory: 1,000 VMs over 4 repositories (plain folders under a temp dir,
or under the directory given as argv[1], e.g. /dev/shm for tmpfs).

The clone probe is a trivial function returning (True, ...): a real probe is called once per
repository and cached for probe_ttl seconds, so it does not change warm figures; its cold cost
is one FICLONE of a small file per repository.

Prints the cold (first listing: every vm.cfg read and parsed) and warm (second listing: stat
only) timings. Targets on python3: cold < 1.5 s, warm < 0.3 s. Runs on Python 2.6-3.13.
"""
from __future__ import print_function

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import ovm_exporter as ox  # noqa: E402

VMS = 1000
REPOS = 4

VM_CFG = """vif = ['mac=00:21:f6:5b:%(m1)02x:%(m2)02x,bridge=10238073c2']
OVM_simple_name = 'bench-vm-%(i)04d'
vnclisten = '127.0.0.1'
disk = ['file:%(repo)s/VirtualDisks/0004fb00001200000000000000%(i)06d.img,xvda,w', \
'file:%(repo)s/VirtualDisks/0004fb00001200000000000001%(i)06d.img,xvdb,w', \
'file:%(iso_repo)s/ISOs/0004fb0000150000000000000000%(r)04d.iso,xvdc:cdrom,r']
vncunused = 1
uuid = '0004fb00-0006-0000-0000-0000%(i)08d'
on_reboot = 'restart'
cpu_weight = 27500
memory = 4096
cpu_cap = 0
maxvcpus = 2
OVM_high_availability = False
maxmem = 4096
OVM_description = 'Benchmark VM number %(i)d, generated'
on_poweroff = 'destroy'
on_crash = 'restart'
name = '0004fb00000600000000000000%(i)06d'
guest_os_type = 'linux'
builder = 'hvm'
vfb = ['type=vnc,vncunused=1,vnclisten=127.0.0.1,keymap=en-us']
vcpus = 2
keymap = 'en-us'
OVM_os_type = 'Oracle Linux 7'
OVM_cpu_compat_group = ''
OVM_domain_type = 'xen_hvm'
"""


def build(base):
    repos = []
    for r in range(REPOS):
        repo_id = '0004fb000003000000000000000000%02d' % r
        mount_point = os.path.join(base, 'Repositories', repo_id)
        for sub in ('VirtualMachines', 'VirtualDisks', 'ISOs'):
            os.makedirs(os.path.join(mount_point, sub))
        meta = {}
        for i in range(r, VMS, REPOS):
            meta['0004fb00001200000000000000%06d.img' % i] = {'OBJECT_TYPE': 'VIRTUAL_DISK',
                                                              'SIMPLE_NAME': 'disk %d' % i}
        meta['0004fb0000150000000000000000%04d.iso' % r] = {'OBJECT_TYPE': 'ISO', 'SIMPLE_NAME': 'iso'}
        with open(os.path.join(mount_point, '.ovsmeta'), 'w') as f:
            f.write(json.dumps(meta))
        repos.append({'id': repo_id, 'mount_point': mount_point, 'filesystem': 'ocfs2'})
    for i in range(VMS):
        repo = repos[i % REPOS]['mount_point']
        iso_repo = repos[(i + 1) % REPOS]['mount_point']
        vm_dir = os.path.join(repo, 'VirtualMachines', '0004fb00000600000000000000%06d' % i)
        os.mkdir(vm_dir)
        with open(os.path.join(vm_dir, 'vm.cfg'), 'w') as f:
            f.write(VM_CFG % {'i': i, 'm1': i // 256, 'm2': i % 256, 'repo': repo,
                              'iso_repo': iso_repo, 'r': (i + 1) % REPOS})
        for name in ('0004fb00001200000000000000%06d.img' % i,
                     '0004fb00001200000000000001%06d.img' % i):
            open(os.path.join(repo, 'VirtualDisks', name), 'w').close()  # disks must be files
    for r in range(REPOS):
        open(os.path.join(repos[r]['mount_point'], 'ISOs',
                          '0004fb0000150000000000000000%04d.iso' % r), 'w').close()
    return repos


def meta_reader(path):
    with open(path, 'rb') as f:
        return json.loads(f.read().decode('utf-8'))


def trivial_probe(directory):
    return True, 'benchmark: trivial probe (real probes are cached per repository)'


def main():
    parent = sys.argv[1] if len(sys.argv) > 1 else None
    base = tempfile.mkdtemp(prefix='bench-discovery-', dir=parent)
    try:
        repos = build(base)
        # drop nothing from the page cache: "cold" here means our caches are empty
        # the mount table is read on every listing as in the server; the benchmark's
        # repositories are plain folders (as the demo's)
        inventory = ox.HostInventory(lambda: repos, meta_reader, trivial_probe,
                                     check_mounts=lambda records: ox.repository_problems(
                                         records, plain_folder_ok=True))
        t0 = time.time()
        vms = inventory.list_vms()
        cold = time.time() - t0
        t0 = time.time()
        again = inventory.list_vms()
        warm = time.time() - t0
        t0 = time.time()
        for _ in range(10):
            inventory.list_vms()
        warm10 = (time.time() - t0) / 10
        t0 = time.time()
        vm = inventory.get_vm('0004fb00000600000000000000000500')
        get_one = time.time() - t0
        assert len(vms) == VMS and len(again) == VMS, len(vms)
        assert all(v.snapshot_compatible for v in vms)
        assert inventory.vm_cfgs.reads == VMS
        assert vm.friendly_name == 'bench-vm-0500'
        print('python %s: %d VMs over %d repositories in %s' % (
            sys.version.split()[0], VMS, REPOS, base))
        print('  cold list_vms: %.3f s (target < 1.5 s)' % cold)
        print('  warm list_vms: %.3f s (target < 0.3 s); mean of 10 more: %.3f s' % (warm, warm10))
        print('  warm get_vm:   %.3f s' % get_one)
        print('  vm.cfg reads: %d, probe calls: %d' % (inventory.vm_cfgs.reads, inventory.probes.calls))
    finally:
        shutil.rmtree(base)


main()
