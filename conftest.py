"""Markers for test_ovm_exporter.py, set here from what each test uses:
  root  - loop mounts (and mount, chattr, /etc): needs root, as CI runs;
  qemu  - OCFS2 volumes inside the qemu guest (.ci/ocfs2-guest.sh);
  slow  - starts exporter servers or other interpreters (2.6.9, 2.7, every pyenv 3.x).
`pytest -m "not root"` needs no root; `-m "not root and not slow"` runs in seconds."""
import pytest

ROOT_FIXTURES = frozenset(['xfs', 'ext4', 'xfs_mount', 'xfs_dir', 'btrfs_dir', 'ext4_dir',
                           'tmpfs_dir', 'workdir'])
INTERPRETER_PARAMS = ('python', 'version', 'interpreter')
SLOW_FIXTURES = frozenset(['exporter_factory', 'root'])  # servers; install.sh runs


def pytest_configure(config):
    for line in __doc__.splitlines()[1:4]:
        config.addinivalue_line('markers', line.strip().replace(' - ', ': ', 1))


def pytest_collection_modifyitems(items):
    for item in items:
        if ROOT_FIXTURES & set(getattr(item, 'fixturenames', ())):
            item.add_marker(pytest.mark.root)
        if 'ocfs2' in item.name:
            item.add_marker(pytest.mark.qemu)
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        if SLOW_FIXTURES & set(getattr(item, 'fixturenames', ())) or [
                name for name in INTERPRETER_PARAMS if params.get(name, '3') != '3']:
            item.add_marker(pytest.mark.slow)
