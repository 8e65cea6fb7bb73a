"""What the tests (test_ovm_exporter.py, its first section) and the benchmarks (bench/) share:
the interpreters, one way to run a command, loop-mounted filesystems, command-line options and
medians, and the test markers. Python 3; the benchmarks need no pytest (bench/ is their
script folder, so `import harness` finds this file); the tests load it as a pytest plugin.

Markers for test_ovm_exporter.py, set from what each test uses:
  root  - loop mounts (and mount, chattr, /etc): needs root, as CI runs;
  qemu  - OCFS2 volumes inside the qemu guest (.ci/ocfs2-guest.sh);
  slow  - starts exporter servers or other interpreters (2.6.9, 2.7, every pyenv 3.x).
`pytest -m "not root"` needs no root; `-m "not root and not slow and not qemu"` is quick.
(PYTEST_DONT_REWRITE: the tests import this module before pytest loads it as a plugin.)"""
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
EXPORTER = os.path.join(HERE, 'ovm_exporter.py')
PYENV_VERSIONS = '/root/.pyenv/versions'
PY26_PREFIX = os.environ.get('OVM_EXPORTER_PY26', '/var/cache/py269')
# Every interpreter the exporter supports: '2.6.9' is the dom0's (2.6.6 there), built by
# .ci/test from ../shared/py26; the others come from pyenv. '3' names the running Python.
PYTHONS = ['2.6.9', '2.7.18', '3.6.15', '3.7.16', '3.8.18', '3.9.18', '3.10.13', '3.11.7',
           '3.12.1', '3.13.0']
RUNNING_PYTHON = '%d.%d.%d' % sys.version_info[:3]


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


class LoopMount(object):
    """A filesystem image on a loop device, mounted in `folder`/mnt (needs root)."""

    def __init__(self, folder, mkfs, size='3G'):
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
