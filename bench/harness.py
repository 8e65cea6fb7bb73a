"""What the tests (test_ovm_exporter.py, its harness section) and the benchmarks (bench/) share:
the one list of interpreters, the ways to run a command, the one loop-mount helper, the start of
a server benchmark, command-line options and medians, and the test markers. Python 3; the
benchmarks need no pytest (bench/ is their script folder, so `import harness` finds this file);
the tests load it as a pytest plugin.

Markers for test_ovm_exporter.py, set from what each test uses:
  root  - loop mounts (and mount, chattr, /etc): needs root, as CI runs;
  qemu  - OCFS2 volumes inside the qemu guest (.ci/ocfs2-guest.sh);
  slow  - starts exporter servers or other interpreters (2.6.9, 2.7, every pyenv 3.x).
`pytest -m "not root"` needs no root; `-m "not root and not slow and not qemu"` is quick.
(PYTEST_DONT_REWRITE: the tests import this module before pytest loads it as a plugin.)"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
EXPORTER = os.path.join(HERE, 'ovm_exporter.py')
PYENV_VERSIONS = os.path.join(os.environ.get('PYENV_ROOT', '/root/.pyenv'), 'versions')
PY26_PREFIX = os.environ.get('OVM_EXPORTER_PY26', '/var/cache/py269')
# Every interpreter the exporter supports: '2.6.9' is the dom0's (2.6.6 there), built by
# .ci/test from ../shared/py26; the others come from pyenv. '3' names the running Python.
PYTHONS = ['2.6.9', '2.7.18', '3.6.15', '3.7.16', '3.8.18', '3.9.18', '3.10.13', '3.11.7',
           '3.12.1', '3.13.0']
RUNNING_PYTHON = '%d.%d.%d' % sys.version_info[:3]
# The server-level tests run under the Python running pytest ('3') and under each Python 2 (the
# dom0's 2.6.9, and 2.7.18): ['3', '2.7.18', '2.6.9']. The other PYTHONS run a subset.
FULL_SUITE_PYTHONS = ['3'] + [v for v in reversed(PYTHONS) if v.startswith('2.')]


def python_file(version):
    """The interpreter of a PYTHONS version ('3': this one); it may not exist."""
    if version == '3':
        return sys.executable
    if version == '2.6.9':
        return os.path.join(PY26_PREFIX, 'bin', 'python2.6')
    return os.path.join(PYENV_VERSIONS, version, 'bin', 'python')


PY26 = python_file('2.6.9')
PY27 = python_file('2.7.18')


def installed_pythons():
    """The PYTHONS interpreters that exist here, as paths."""
    return [path for path in map(python_file, PYTHONS) if os.path.exists(path)]


def bench_pythons(requested):
    """The exporter interpreters of a server benchmark: --python as given, else python3 and
    Python 2.7 where it is installed."""
    return requested or ['python3'] + ([PY27] if os.path.exists(PY27) else [])


def run(command, stdin=None, merge_stderr=True, text=True, **kwargs):
    """Run a command (stdin: bytes to feed it) and return its output, as text unless text is
    False; stderr is in it unless merge_stderr is False. AssertionError when it fails."""
    process = subprocess.Popen(command, stdin=None if stdin is None else subprocess.PIPE,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                               **kwargs)
    out, err = process.communicate(stdin)
    if process.returncode != 0:
        raise AssertionError('%s failed (%d): %s' % (command, process.returncode,
                                                    (err or out).decode('utf-8', 'replace')))
    return out.decode('utf-8', 'replace') if text else out


def run_status(command, env=None):
    """Run a command that may fail -> (exit status, stdout text, stderr text)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = process.communicate()
    return process.returncode, out.decode('utf-8', 'replace'), err.decode('utf-8', 'replace')


# ----------------------------------------------------------------------------- loop mounts ---

MKFS_XFS_REFLINK = ['mkfs.xfs', '-q', '-m', 'reflink=1']


def refuse(reason):
    """Where a loop mount cannot be made: a benchmark exits; the tests skip (pytest_configure
    below puts pytest.skip here)."""
    sys.exit(reason)


def need_root(*tools):
    """The one root check: loop mounts (and the tools they need) or refuse."""
    if os.geteuid() != 0:
        refuse('needs root for loop mounts (CI runs as root)')
    for tool in tools:
        if shutil.which(tool) is None:
            refuse('needs %s (.ci/setup installs it: apt-get install xfsprogs btrfs-progs '
                   'e2fsprogs util-linux nginx-light wrk)' % tool)


class LoopMount(object):
    """A filesystem image on a loop device, mounted in `folder`/mnt (needs root)."""

    def __init__(self, folder, mkfs, size='3G'):
        need_root(mkfs[0])
        self.image = os.path.join(folder, 'fs.img')
        self.path = os.path.join(folder, 'mnt')
        os.mkdir(self.path)
        run(['truncate', '-s', str(size), self.image])
        run(mkfs + [self.image])
        run(['mount', '-o', 'loop', self.image, self.path])

    def close(self):
        for _ in range(20):
            if subprocess.call(['umount', self.path]) == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.call(['umount', '-l', self.path])
        os.unlink(self.image)


@contextlib.contextmanager
def loop_mount(mkfs, size, name):
    """A LoopMount in a new temporary folder: yields its path; then unmounts, removes all."""
    base = tempfile.mkdtemp(prefix='ovmx-%s-' % name)
    try:
        mount = LoopMount(base, mkfs, size)
        try:
            yield mount.path
        finally:
            mount.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def start_server_bench(tools):
    """The start of a server benchmark (bench_download, bench_requests): root and `tools`, or
    exit; SIGTERM then raises KeyboardInterrupt, so that the benchmark cleans up."""
    need_root(*tools)

    def on_signal(signum, frame):
        raise KeyboardInterrupt('signal %d' % signum)
    signal.signal(signal.SIGTERM, on_signal)


def option(name, default):
    """A benchmark's `--name value` from the command line, else default."""
    if name in sys.argv:
        return sys.argv[sys.argv.index(name) + 1]
    return default


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


# ------------------------------------------------------------ pytest plugin: test markers ---

def _pytest_mark():
    import pytest  # only the tests load this part
    return pytest.mark


ROOT_FIXTURES = frozenset(['xfs', 'ext4', 'xfs_mount', 'xfs_dir', 'btrfs_dir', 'ext4_dir',
                           'tmpfs_dir', 'workdir'])
INTERPRETER_PARAMS = ('python', 'version', 'interpreter')
SLOW_FIXTURES = frozenset(['exporter_factory', 'root'])  # servers; install.sh runs


def needs_root(function):
    """Mark a test `root` that makes its own loop mount (no root fixture says so)."""
    function.needs_root = True
    return function


def pytest_configure(config):
    global refuse
    import pytest
    refuse = pytest.skip
    for line in __doc__.split('Markers for')[1].splitlines()[1:4]:
        config.addinivalue_line('markers', line.strip().replace(' - ', ': ', 1))


def pytest_collection_modifyitems(items):
    for item in items:
        if (ROOT_FIXTURES & set(getattr(item, 'fixturenames', ()))
                or getattr(getattr(item, 'function', None), 'needs_root', False)):
            item.add_marker(_pytest_mark().root)
        if 'ocfs2' in item.name:
            item.add_marker(_pytest_mark().qemu)
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        if SLOW_FIXTURES & set(getattr(item, 'fixturenames', ())) or [
                name for name in INTERPRETER_PARAMS if params.get(name, '3') != '3']:
            item.add_marker(_pytest_mark().slow)
