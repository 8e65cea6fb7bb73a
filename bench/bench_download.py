"""Download speed of a snapshot disk over TLS: the exporter against nginx, on 127.0.0.1.

Run as root from the repo root:
    python3 bench/bench_download.py [--python PATH[@SCRIPT] ...] [--size-gib N] [--rounds N]
        [--streams 1,4] [--no-nginx-auto] [--keep]
Defaults (2 GiB, 5 rounds, python3 + Python 2.7, nginx with 1 and auto workers): about 2-2.5
minutes. PYTHON@SCRIPT runs a modified copy of ovm_exporter.py beside the original, e.g.
    --python python3 --python python3@/tmp/copy/ovm_exporter.py
--keep leaves the servers up at the end (prints curl command lines) until Enter, for profiling.

What it does (everything under one temporary folder, removed at the end, also on failure):
- a throwaway CA and server certificate (ovm_exporter.make_certificates), used by both servers;
- an XFS reflink loop mount holding one repository per exporter interpreter, each with one VM
  whose one disk is --size-gib GiB of random data (the second repository's disk is a reflink of
  the first, so both read the same blocks);
- a stand-in OVM Manager (HTTPS, in this process) that accepts one user, for the login;
- `ovm_exporter.py serve --config ...` under each --python interpreter (default: python3 and
  Python 2.7); the bench logs in, creates a snapshot, and reads the snapshot file once so that
  it is in the page cache;
- nginx (apt-get install nginx-light if missing) serving the first exporter's snapshot file
  (the same inode, so the same cached pages) with the same certificate, `ssl_protocols TLSv1.2
  TLSv1.3`, default ciphers, worker_processes 1 and, on a second port, worker_processes auto;
- curl as the client: 1 stream (the whole file) and 4 streams (four curl processes, each one
  quarter with a Range header), rounds interleaved nginx, exporter, nginx, exporter, ...
Reported: median MB/s (10^6 bytes/s), the median of the per-round ratios to nginx (same round,
same stream count), server CPU-seconds per GB (utime+stime from /proc, nginx: master+workers) and
curl's CPU-seconds per GB (the client shares the 2 cores with the server).
"""
import argparse
import base64
import hashlib
import http.server
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import ovm_exporter as ox  # noqa: E402  (certificates only; the servers run in subprocesses)
from harness import (EXPORTER, MKFS_XFS_REFLINK, PY27, LoopMount, bench_pythons,  # noqa: E402
                     run, start_server_bench)

USER, PASSWORD = 'admin', 'bench-password-1'
CLK_TCK = os.sysconf('SC_CLK_TCK')
MiB = 1 << 20


def log(message):
    sys.stderr.write('[bench %6.1fs] %s\n' % (time.time() - T0, message))
    sys.stderr.flush()


T0 = time.time()


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def cpu_seconds(pids):
    """utime+stime of the processes (all their threads, live and dead), in seconds."""
    total = 0
    for pid in pids:
        with open('/proc/%d/stat' % pid) as handle:
            fields = handle.read().rsplit(')', 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / float(CLK_TCK)


def children_of(pid):
    found = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open('/proc/%s/stat' % name) as handle:
                    fields = handle.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(name))
    return found


def drop_file_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_through(path):
    """Read a file once (page cache warm-up); returns seconds."""
    started = time.time()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 8 * MiB):
            pass
    finally:
        os.close(fd)
    return time.time() - started


def stop_process(process, sig=signal.SIGTERM, timeout=35.0):
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ------------------------------------------------------------------ stand-in OVM Manager ---
class ManagerHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.0'
    expected = 'Basic ' + base64.b64encode(('%s:%s' % (USER, PASSWORD)).encode()).decode()

    def do_GET(self):
        ok = self.headers.get('Authorization') == self.expected
        body = b'[]' if ok else b'<html>Unauthorized</html>'
        self.send_response(200 if ok else 401)
        self.send_header('Content-Type', 'application/json' if ok else 'text/html')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ManagerServer(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # like a real Manager's; 5 (the default) drops SYNs of a crowd


def start_manager(certs):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs['srv-pub.pem'], certs['srv-key.pem'])
    server = ManagerServer(('127.0.0.1', 0), ManagerHandler)
    # The handshake happens in each connection's thread (on its first read), not in accept:
    # a crowd of logins must not queue behind one another here, or overflow the backlog.
    server.socket = context.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.1})
    thread.daemon = True
    thread.start()
    return server


# ------------------------------------------------------------------------------ servers ---
class Exporter(object):
    """`ovm_exporter.py serve` under one interpreter, with its own repository and VM."""

    def __init__(self, folder, python, certs, manager_url, repository):
        self.folder = folder
        self.python, _, script = python.partition('@')
        self.python = shutil.which(self.python) or self.python
        self.script = os.path.abspath(script or EXPORTER)
        out = subprocess.run([self.python, '-c', 'import sys; print("%d.%d.%d" % '
                              'sys.version_info[:3])'], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, check=True)
        self.interpreter = 'py' + out.stdout.decode().strip()
        if script:
            self.interpreter += '@' + os.path.basename(os.path.dirname(self.script))
        self.repository = repository
        self.process = None
        self.log_path = os.path.join(folder, 'exporter.log')
        self.config_path = os.path.join(folder, 'config.toml')
        os.mkdir(folder)
        q = json.dumps
        lines = ['db_file = %s' % q(os.path.join(folder, 'exporter.db')),
                 'ovm_endpoint = %s' % q(manager_url),
                 'ovm_ca_certificate = %s' % q(certs['ca-pub.pem']),
                 'ovm_fingerprint_file = %s' % q(os.path.join(folder, 'manager.fingerprint')),
                 'ovs_agent_db_dir = %s' % q(os.path.join(folder, 'no-ovs-agent')),
                 'ovm_timeout = "10s"', 'log_level = "info"',
                 '[jwt]', 'secret = %s' % q(base64.b16encode(os.urandom(32)).decode()),
                 '[api]', 'bind = "127.0.0.1"', 'port = 0',
                 '[api.tls]', 'certificate = %s' % q(certs['srv-pub.pem']),
                 'key = %s' % q(certs['srv-key.pem']),
                 'ca_certificate = %s' % q(certs['ca-pub.pem']),
                 '[[repository]]', 'id = %s' % q(repository['id']),
                 'mount_point = %s' % q(repository['mount_point']), 'filesystem = "xfs"']
        with open(self.config_path, 'w') as handle:
            handle.write('\n'.join(lines) + '\n')
        os.chmod(self.config_path, 0o600)

    @property
    def label(self):
        return 'exporter'

    def start(self, timeout=30.0):
        self.log_handle = open(self.log_path, 'ab')
        self.process = subprocess.Popen([self.python, self.script, 'serve', '--config',
                                         self.config_path], stdout=self.log_handle,
                                        stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.time() + timeout
        import re
        while time.time() < deadline:
            with open(self.log_path, 'rb') as handle:
                match = re.search(br'serving on https://[^:]+:(\d+)', handle.read())
            if match:
                self.port = int(match.group(1))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError('the exporter (%s) did not start:\n%s' % (self.python, self.log()))

    def log(self):
        with open(self.log_path, 'rb') as handle:
            return handle.read().decode('utf-8', 'replace')[-4000:]

    def call(self, method, path, body=None):
        connection = http.client.HTTPSConnection(
            '127.0.0.1', self.port, timeout=120,
            context=ssl._create_unverified_context())  # noqa: S323 (own throwaway CA)
        headers = {'Content-Type': 'application/json'}
        if getattr(self, 'token', None):
            headers['Authorization'] = 'Bearer ' + self.token
        try:
            connection.request(method, '/api/v1' + path, body, headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError('%s %s: %d %s' % (method, path, response.status, data[:500]))
        return json.loads(data.decode())

    def prepare(self):
        """Log in, snapshot the VM, find the snapshot file; returns its path."""
        self.token = None
        self.token = self.call('POST', '/auth/login', json.dumps(
            {'username': USER, 'password': PASSWORD}))['token']
        vm, disk = self.repository['vm'], self.repository['disk']
        self.snapshot = self.call('POST', '/vms/%s/snapshots' % vm)['id']
        self.url = 'https://127.0.0.1:%d/api/v1/vms/%s/snapshots/%s/disks/%s' % (
            self.port, vm, self.snapshot, disk)
        for folder, _, files in os.walk(os.path.join(self.repository['mount_point'],
                                                     ox.SNAPSHOTS_DIR_NAME)):
            if disk in files and self.snapshot in folder:
                return os.path.join(folder, disk)
        raise RuntimeError('cannot find the snapshot file of %s' % self.snapshot)

    def headers(self):
        return ['-H', 'Authorization: Bearer ' + self.token]

    def pids(self):
        return [self.process.pid]

    def stop(self):
        stop_process(self.process)
        if getattr(self, 'log_handle', None):
            self.log_handle.close()


NGINX_CONF = """
worker_processes %(workers)s;
user root;
daemon off;
master_process on;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 256; }
http {
    default_type application/octet-stream;
    access_log off;
    client_body_temp_path %(dir)s/client_body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    sendfile on;
    keepalive_timeout 65;
    server {
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate %(cert)s;
        ssl_certificate_key %(key)s;
        ssl_protocols TLSv1.2 TLSv1.3;
        root %(root)s;
        location / { }
    }
}
"""


class Nginx(object):
    def __init__(self, folder, workers, certs, root, name):
        self.folder = folder
        self.workers = workers
        self.port = free_port()
        self.process = None
        os.makedirs(folder)
        self.conf = os.path.join(folder, 'nginx.conf')
        with open(self.conf, 'w') as handle:
            handle.write(NGINX_CONF % {'workers': workers, 'dir': folder, 'port': self.port,
                                       'cert': certs['srv-pub.pem'],
                                       'key': certs['srv-key.pem'], 'root': root})
        self.url = 'https://127.0.0.1:%d/%s' % (self.port, name)

    label = 'nginx'

    @property
    def interpreter(self):
        return 'workers=%s' % self.workers

    def start(self, timeout=15.0):
        self.process = subprocess.Popen(['nginx', '-p', self.folder, '-c', self.conf,
                                         '-e', os.path.join(self.folder, 'error.log')],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                break
            try:
                socket.create_connection(('127.0.0.1', self.port), 1).close()
                if children_of(self.process.pid):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError('nginx did not start: %s' % open(
            os.path.join(self.folder, 'error.log')).read()[-2000:])

    def headers(self):
        return []

    def pids(self):
        return [self.process.pid] + children_of(self.process.pid)

    def stop(self):
        stop_process(self.process, signal.SIGQUIT, 10.0)
        stop_process(self.process, signal.SIGTERM, 10.0)


def ensure_nginx():
    if shutil.which('nginx'):
        return
    log('nginx is missing: apt-get install nginx-light')
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    for attempt in range(30):
        result = subprocess.run(['apt-get', 'install', '-y', '-q', 'nginx-light'], env=env)
        if result.returncode == 0 and shutil.which('nginx'):
            # the package starts a system nginx on port 80; this bench does not need it
            subprocess.run(['systemctl', 'stop', 'nginx'], stderr=subprocess.DEVNULL)
            return
        time.sleep(10)  # dpkg may be locked by another apt
    raise RuntimeError('could not install nginx')


# ---------------------------------------------------------------------------- the client ---
def curl_command(server, extra=()):
    return ['curl', '-sk', '--http1.1', '--max-time', '300', '-o', '/dev/null',
            '-w', '%{http_code} %{size_download} %{speed_download}'] + \
        server.headers() + list(extra) + [server.url]


def download(server, size, streams):
    """-> (MB/s, server CPU-s, client CPU-s, bytes)."""
    if streams == 1:
        pieces = [None]
    else:
        quarter = size // streams
        pieces = [(i * quarter, size - 1 if i == streams - 1 else (i + 1) * quarter - 1)
                  for i in range(streams)]
    pids = server.pids()
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = cpu_seconds(pids)
    started = time.time()
    processes = []
    for piece in pieces:
        extra = [] if piece is None else ['-H', 'Range: bytes=%d-%d' % piece]
        processes.append(subprocess.Popen(curl_command(server, extra), stdout=subprocess.PIPE))
    outputs = [p.communicate()[0].decode().split() for p in processes]
    elapsed = time.time() - started
    cpu = cpu_seconds(pids) - cpu_before
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = (client_after.ru_utime - client_before.ru_utime
              + client_after.ru_stime - client_before.ru_stime)
    total = 0
    for process, piece, output in zip(processes, pieces, outputs):
        want_status, want = ('200', size) if piece is None else ('206', piece[1] - piece[0] + 1)
        if process.returncode != 0 or output[0] != want_status or int(output[1]) != want:
            raise RuntimeError('%s %s: curl exit %s, output %r (wanted %s, %d bytes)' % (
                server.label, server.interpreter, process.returncode, output, want_status,
                want))
        total += int(output[1])
    if streams == 1:
        speed = float(outputs[0][2]) / 1e6  # curl's own figure, as for the single stream
    else:
        speed = total / elapsed / 1e6
    return speed, cpu, client, total


def check_same_bytes(server, path, size):
    """The first and last MiB through the server equal the file's."""
    with open(path, 'rb') as handle:
        head = handle.read(MiB)
        handle.seek(size - MiB)
        tail = handle.read(MiB)
    for first, expected in ((0, head), (size - MiB, tail)):
        out = subprocess.run(['curl', '-sfk', '-H', 'Range: bytes=%d-%d' % (first, first + MiB - 1)]
                             + server.headers() + [server.url], stdout=subprocess.PIPE,
                             check=True).stdout
        if hashlib.sha256(out).digest() != hashlib.sha256(expected).digest():
            raise RuntimeError('%s returned other bytes at %d' % (server.label, first))
    verbose = subprocess.run(['curl', '-skv', '--http1.1', '-I'] + server.headers()
                             + [server.url], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE).stderr.decode('utf-8', 'replace')
    for line in verbose.splitlines():
        if 'SSL connection using' in line:
            return line.split('using', 1)[1].strip()
    return '?'


# -------------------------------------------------------------------------------- setup ---
def make_repository(base, index, source=None, size=0):
    repo_id = '0004fb0000030000bbbb%012x' % index
    vm = '0004fb0000060000bbbb%012x' % index
    disk = '0004fb0000120000bbbb%012x.img' % index
    mount_point = os.path.join(base, repo_id)
    for sub in ('VirtualDisks', 'VirtualMachines/' + vm, 'ISOs'):
        os.makedirs(os.path.join(mount_point, sub))
    path = os.path.join(mount_point, 'VirtualDisks', disk)
    if source is None:
        with open(path, 'wb') as handle:
            for _ in range(size // (16 * MiB)):
                handle.write(os.urandom(16 * MiB))
            handle.write(os.urandom(size % (16 * MiB)))
    else:
        run(['cp', '--reflink=always', source, path])
    with open(os.path.join(mount_point, 'VirtualMachines', vm, 'vm.cfg'), 'w') as handle:
        handle.write("OVM_simple_name = 'bench%d'\nname = '%s'\nuuid = '%s'\n"
                     "disk = ['file:%s,xvda,w']\nmemory = 1024\nvcpus = 1\n"
                     % (index, vm, '%s-%s-%s-%s-%s' % (vm[:8], vm[8:12], vm[12:16], vm[16:20],
                                                       vm[20:]), path))
    return {'id': repo_id, 'mount_point': mount_point, 'vm': vm, 'disk': disk, 'live': path}


def make_repositories(base, count, size):
    """One repository per exporter: the first with a disk of `size` random bytes, the others
    with a reflink of it (the same blocks)."""
    repositories = [make_repository(base, 1, size=size)]
    for index in range(2, count + 1):
        repositories.append(make_repository(base, index, source=repositories[0]['live']))
    return repositories


def median(values):
    return statistics.median(values) if values else float('nan')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--python', action='append', default=None,
                        help='interpreter for the exporter, PYTHON or PYTHON@SCRIPT (to bench '
                             'a modified copy of ovm_exporter.py); repeat for several '
                             '[default: python3 and %s]' % PY27)
    parser.add_argument('--size-gib', type=float, default=2.0, help='disk size [2]')
    parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds [5]')
    parser.add_argument('--streams', default='1,4', help='stream counts [1,4]')
    parser.add_argument('--no-nginx-auto', action='store_true',
                        help='skip nginx with worker_processes auto')
    parser.add_argument('--keep', action='store_true',
                        help='keep the servers up at the end until Enter (for profiling)')
    args = parser.parse_args()
    start_server_bench(('curl', 'mkfs.xfs', 'openssl'))
    pythons = bench_pythons(args.python)
    streams_list = [int(s) for s in args.streams.split(',')]
    size = int(args.size_gib * (1 << 30)) // 4096 * 4096
    ensure_nginx()
    folder = tempfile.mkdtemp(prefix='ovm-bench-download-')
    mount = manager = None
    servers = []
    try:
        certs = ox.make_certificates(folder)
        mount = LoopMount(folder, MKFS_XFS_REFLINK, max(8 << 30, 2 * size + (4 << 30)))
        log('writing %.2f GiB of random data' % (size / float(1 << 30)))
        repositories = make_repositories(mount.path, len(pythons), size)
        manager = start_manager(certs)
        manager_url = 'https://127.0.0.1:%d' % manager.server_address[1]

        exporters = []
        snapshot_files = []
        for index, python in enumerate(pythons):
            exporter = Exporter(os.path.join(folder, 'exporter%d' % index), python, certs,
                                manager_url, repositories[index])
            exporter.start()
            servers.append(exporter)
            snapshot_files.append(exporter.prepare())
            exporters.append(exporter)
            log('exporter %s on port %d, snapshot %s' % (exporter.interpreter, exporter.port,
                                                         exporter.snapshot))
        # Only the snapshot files stay in the page cache: not the live disks, not the image.
        os.sync()
        for repository in repositories:
            drop_file_cache(repository['live'])
        drop_file_cache(mount.image)
        for path in snapshot_files:
            log('warming %s: %.1fs' % (os.path.basename(path), read_through(path)))
            log('          again: %.2fs' % read_through(path))

        nginxes = []
        root, name = os.path.split(snapshot_files[0])
        for workers in ['1'] + ([] if args.no_nginx_auto else ['auto']):
            server = Nginx(os.path.join(folder, 'nginx-' + workers), workers, certs, root, name)
            server.start()
            servers.append(server)
            nginxes.append(server)
            log('nginx worker_processes %s on port %d (%d workers)' % (
                workers, server.port, len(children_of(server.process.pid))))

        order = []  # nginx, exporter, nginx, exporter, ...
        for index in range(max(len(nginxes), len(exporters))):
            if index < len(nginxes):
                order.append(nginxes[index])
            if index < len(exporters):
                order.append(exporters[index])
        labels = dict((id(s), (s.label, s.interpreter)) for s in order)
        for server in order:
            path = snapshot_files[exporters.index(server)] if server in exporters \
                else snapshot_files[0]
            cipher = check_same_bytes(server, path, size)
            log('%s %s: same bytes, %s' % (labels[id(server)] + (cipher,)))

        results = {}  # (server id, streams) -> list of (MB/s, cpu/GB, client cpu/GB)
        for round_number in range(args.rounds):
            for streams in streams_list:
                for server in order:
                    speed, cpu, client, total = download(server, size, streams)
                    results.setdefault((id(server), streams), []).append(
                        (speed, cpu / (total / 1e9), client / (total / 1e9)))
                    log('round %d %s %s %d stream(s): %.0f MB/s, server %.2f CPU-s/GB, '
                        'curl %.2f CPU-s/GB' % ((round_number + 1,) + labels[id(server)] + (
                            streams, speed, cpu / (total / 1e9), client / (total / 1e9))))

        print()
        print('Disk download over TLS on 127.0.0.1, %.2f GiB of random data in page cache, '
              '%d rounds, medians; ratio = median of per-round ratios to nginx (1 worker%s)'
              % (size / float(1 << 30), args.rounds, '' if args.no_nginx_auto
                 else ' / auto'))
        header = '%-9s %-26s %7s %9s %14s %16s %14s' % (
            'server', 'interpreter', 'streams', 'MB/s', 'ratio/nginx',
            'server CPU-s/GB', 'curl CPU-s/GB')
        print(header)
        print('-' * len(header))
        for streams in streams_list:
            for server in order:
                rows = results[(id(server), streams)]
                ratios = []
                for reference in nginxes:
                    refs = results[(id(reference), streams)]
                    ratios.append(median([r[0] / f[0] for r, f in zip(rows, refs)]))
                print('%-9s %-26s %7d %9.0f %14s %16.2f %14.2f' % (
                    labels[id(server)] + (streams, median([r[0] for r in rows]),
                                          ' / '.join('%.2f' % r for r in ratios),
                                          median([r[1] for r in rows]),
                                          median([r[2] for r in rows]))))
        print('targets: exporter >= 0.90x nginx with 1 stream, >= 1.00x with 4 streams')
        sys.stdout.flush()
        if args.keep:
            for server in order:
                print('%s %s pid %d: curl -sk %s %s' % (
                    labels[id(server)] + (server.process.pid, ' '.join(
                        "'%s'" % h if h != '-H' else h for h in server.headers()),
                        server.url)))
            input('servers kept up; press Enter to stop and clean up ')
        for exporter in exporters:
            if 'Traceback' in exporter.log():
                log('exporter %s logged a traceback:\n%s' % (exporter.interpreter,
                                                             exporter.log()))
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as exc:  # keep cleaning up
                log('stopping %s: %s' % (server.label, exc))
        if manager is not None:
            manager.shutdown()
            manager.server_close()
        if mount is not None:
            mount.close()
        shutil.rmtree(folder, ignore_errors=True)
        log('cleaned up %s' % folder)


if __name__ == '__main__':
    main()
