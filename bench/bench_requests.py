"""Small requests and crowds: the exporter against nginx (1 worker), over TLS on 127.0.0.1.

Run as root from the repo root:
    python3 bench/bench_requests.py [--python PATH[@SCRIPT] ...] [--size-mib N]
        [--seconds N] [--rounds N] [--ranges 4096,65536,1048576] [--conns 1,8] [--no-new-tls]
        [--no-crowd] [--idle 1000 --stalled 200 --slowloris 200]
PYTHON@SCRIPT runs another copy of ovm_exporter.py, e.g. today's beside the new one:
    git show 8bbe230:ovm_exporter.py > /tmp/old/ovm_exporter.py
    python3 bench/bench_requests.py --python python3@/tmp/old/ovm_exporter.py --python python3

What it does (setup shared with bench_download.py: certificate, XFS reflink loop mount, one
repository per exporter with a --size-mib disk of random data in the page cache, stand-in OVM
Manager, nginx serving the first snapshot file with the same certificate):
- wrk (apt-get install wrk), one thread, over keep-alive connections: GET of random ranges
  aligned to their size, for each --ranges size and --conns count; requests per second, the
  ratio to nginx in the same round, and the server's CPU time per request (utime+stime from
  /proc: steadier than rates on a shared machine). --rounds repeats every run, servers in
  turn. 64 KiB with `Connection: close` too (a new TLS connection per request; wrk offers no
  session ticket, so this is full handshakes).
- the crowd: --idle idle TCP connections, --stalled TLS handshakes that stop after half a
  ClientHello, --slowloris TLS connections sending a request head one byte every 5 s, all open
  at once; then the time for a new client to log in and read a 1 MiB range, alone and as 16
  clients at once, and the server's memory (VmRSS) and open descriptors in that state.
- `client download` of a disk of --client-chunks separate 4 KiB chunks, by this file and by
  each --client SCRIPT (e.g. an older ovm_exporter.py): seconds and requests.
"""
import argparse
import base64
import http.client
import json
import os
import random
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_download as bd  # noqa: E402  (setup: servers, certificate, XFS, Manager)
from bench_download import log, MiB  # noqa: E402
from harness import (EXPORTER, MKFS_XFS_REFLINK, PY27, LoopMount, bench_pythons,  # noqa: E402
                     start_server_bench)

LUA = """
local size, block, path, token = %(size)d, %(block)d, "%(path)s", "%(token)s"
local count = math.floor(size / block)
local extra = %(extra)s
math.randomseed(%(seed)d)
request = function()
  local first = math.random(0, count - 1) * block
  local headers = {["Range"] = "bytes=" .. first .. "-" .. (first + block - 1)}
  if token ~= "" then headers["Authorization"] = "Bearer " .. token end
  for name, value in pairs(extra) do headers[name] = value end
  return wrk.format("GET", path, headers)
end
"""


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def wrk(server, folder, size, block, conns, seconds, close=False):
    """-> (requests per second, server CPU microseconds per request); raises if any answer
    was not 206."""
    url = server.url
    match = re.match(r'(https://[^/]+)(/.*)', url)
    token = getattr(server, 'token', '') or ''
    script = os.path.join(folder, 'wrk-%d-%d.lua' % (os.getpid(), random.randint(0, 1 << 30)))
    with open(script, 'w') as handle:
        handle.write(LUA % {'size': size, 'block': block, 'path': match.group(2),
                            'token': token, 'seed': random.randint(0, 1 << 30),
                            'extra': '{["Connection"] = "close"}' if close else '{}'})
    cpu_before = bd.cpu_seconds(server.pids())
    out = subprocess.run(['wrk', '-t1', '-c%d' % conns, '-d%ds' % seconds, '-s', script,
                          match.group(1)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         check=True).stdout.decode()
    os.unlink(script)
    if 'Non-2xx' in out or 'Socket errors' in out and not close:
        raise RuntimeError('%s %s: wrk saw errors:\n%s' % (server.label, server.interpreter,
                                                           out))
    cpu = bd.cpu_seconds(server.pids()) - cpu_before
    rate = float(re.search(r'Requests/sec:\s*([0-9.]+)', out).group(1))
    return rate, cpu * 1e6 / max(1.0, rate * seconds)


def server_state(pid):
    with open('/proc/%d/status' % pid) as handle:
        rss = int(re.search(r'VmRSS:\s*(\d+)', handle.read()).group(1))
    return rss / 1024.0, len(os.listdir('/proc/%d/fd' % pid))


_ONE_USER = bd.ManagerHandler.do_GET


class CrowdManager(bd.ManagerHandler):
    """The stand-in Manager, accepting every user name with the bench's password: the crowd's
    16 clients are 16 users on 16 addresses (the exporter brakes more than 5 logins in flight
    for one user or address)."""

    def do_GET(self):
        user = 'admin'
        try:
            text = base64.b64decode(self.headers.get('Authorization', '')[6:]).decode()
            user = text.partition(':')[0]
        except ValueError:
            pass
        self.expected = 'Basic ' + base64.b64encode(('%s:%s' % (user, bd.PASSWORD)).encode()
                                                    ).decode()
        _ONE_USER(self)


def read_range(exporter, results, index):
    """Log in (as user crowdN from 127.0.0.N+10) and read 1 MiB; seconds into
    results[index] (None on failure)."""
    started = time.time()
    source = ('127.0.0.%d' % (10 + index), 0)
    try:
        connection = http.client.HTTPSConnection(
            '127.0.0.1', exporter.port, timeout=10, source_address=source,
            context=ssl._create_unverified_context())  # noqa: S323 (own CA)
        connection.request('POST', '/api/v1/auth/login', json.dumps(
            {'username': 'crowd%d' % index, 'password': bd.PASSWORD}))
        answer = connection.getresponse()
        answer.read()
        connection.close()
        if answer.status != 200:
            raise RuntimeError('login: %d' % answer.status)
        sock = socket.create_connection(('127.0.0.1', exporter.port), timeout=10,
                                        source_address=source)
        tls = ssl._create_unverified_context().wrap_socket(sock)  # noqa: S323 (own CA)
        path = exporter.url.split(str(exporter.port), 1)[1]
        tls.sendall(('GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n'
                     'Range: bytes=0-%d\r\nConnection: close\r\n\r\n'
                     % (path, exporter.token, MiB - 1)).encode())
        data = b''
        while True:
            block = tls.recv(1 << 20)
            if not block:
                break
            data += block
        tls.close()
        if not data.startswith(b'HTTP/1.1 206 ') or len(data) < MiB:
            raise RuntimeError(data[:200])
        results[index] = time.time() - started
    except Exception as exc:
        log('crowd client %d failed: %s' % (index, exc))
        results[index] = None


def crowd(exporter, idle, stalled, slowloris):
    """Open the crowd, time new clients, report the server's state."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    slow = []
    stop = threading.Event()
    try:
        refused = 0
        for _ in range(idle):
            held.append(socket.create_connection(('127.0.0.1', exporter.port)))
        for _ in range(stalled):
            sock = socket.create_connection(('127.0.0.1', exporter.port))
            sock.sendall(b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03')
            held.append(sock)
        context = ssl._create_unverified_context()  # noqa: S323 (own CA)
        for _ in range(slowloris):
            try:
                tls = context.wrap_socket(socket.create_connection(('127.0.0.1', exporter.port),
                                                                   timeout=10))
                tls.sendall(b'G')
                slow.append(tls)
            except (OSError, ssl.SSLError):  # a server that cannot take them all
                refused += 1

        def drip():
            head = b'ET / HTTP/1.1\r\nX-Slow: ' + b'a' * 1000
            position = 0
            while not stop.wait(5.0):
                for tls in slow:
                    try:
                        tls.sendall(head[position:position + 1])
                    except (OSError, ssl.SSLError):
                        pass
                position += 1
        dripper = threading.Thread(target=drip)
        dripper.daemon = True
        dripper.start()
        time.sleep(1.0)  # let the server take them all in
        rss, fds = server_state(exporter.process.pid)
        alone = [None]
        read_range(exporter, alone, 0)
        many = [None] * 16
        threads = [threading.Thread(target=read_range, args=(exporter, many, i))
                   for i in range(16)]
        started = time.time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together = time.time() - started
        return {'alone': alone[0], 'sixteen': together, 'refused': refused,
                'failed': sum(1 for r in many if r is None), 'rss_mib': rss, 'fds': fds}
    finally:
        stop.set()
        for sock in held + slow:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def disk_requests(exporter):
    """Disk requests in the exporter's access log so far."""
    with open(exporter.log_path, 'rb') as handle:
        return handle.read().count(b'/disks/')


def client_downloads(folder, mount, certs, manager_url, chunks, scripts):
    """-> [(script, seconds, requests)]: `client download` of a disk of `chunks` separate
    4 KiB chunks (a hole after each), served by this exporter under python3."""
    repository = bd.make_repository(mount, 99, size=0)
    with open(repository['live'], 'r+b') as handle:
        handle.truncate(chunks * 8192)
        block = os.urandom(4096)
        for index in range(chunks):
            handle.seek(index * 8192)
            handle.write(block)
    exporter = bd.Exporter(os.path.join(folder, 'exporter-client'), 'python3', certs,
                           manager_url, repository)
    exporter.start()
    try:
        exporter.prepare()
        results = []
        env = dict(os.environ, OVM_EXPORTER_PASSWORD=bd.PASSWORD)
        for script in scripts:
            image = os.path.join(folder, 'client.img')
            before = disk_requests(exporter)
            started = time.time()
            subprocess.run(['python3', script, 'client', '--url',
                            'https://127.0.0.1:%d' % exporter.port, '--insecure', '--user',
                            bd.USER, 'download', repository['vm'], exporter.snapshot,
                            repository['disk'], image], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            elapsed = time.time() - started
            with open(image, 'rb') as mine, open(repository['live'], 'rb') as theirs:
                while True:
                    block = mine.read(8 * MiB)
                    if block != theirs.read(8 * MiB):
                        raise RuntimeError('%s wrote another image' % script)
                    if not block:
                        break
            os.unlink(image)
            results.append((script, elapsed, disk_requests(exporter) - before))
            log('client download %s: %.1fs' % (script, elapsed))
        return results
    finally:
        exporter.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--python', action='append', default=None,
                        help='interpreter for the exporter, PYTHON or PYTHON@SCRIPT; repeat '
                             'for several [default: python3 and %s]' % PY27)
    parser.add_argument('--size-mib', type=int, default=1024, help='disk size [1024]')
    parser.add_argument('--seconds', type=int, default=5, help='per wrk run [5]')
    parser.add_argument('--rounds', type=int, default=1,
                        help='rounds of all runs, servers in turn in each [1]')
    parser.add_argument('--ranges', default='4096,65536,1048576', help='range sizes')
    parser.add_argument('--conns', default='1,8', help='keep-alive connection counts [1,8]')
    parser.add_argument('--no-new-tls', action='store_true',
                        help='skip the new-TLS-connection-per-request runs')
    parser.add_argument('--no-crowd', action='store_true', help='skip the crowd')
    parser.add_argument('--idle', type=int, default=1000)
    parser.add_argument('--stalled', type=int, default=200)
    parser.add_argument('--slowloris', type=int, default=200)
    parser.add_argument('--client-chunks', type=int, default=100000,
                        help='client download of a disk of this many 4 KiB chunks, with each '
                             '--client SCRIPT (0: skip) [100000]')
    parser.add_argument('--client', action='append', default=None,
                        help='an ovm_exporter.py whose `client download` is timed beside this '
                             'one, e.g. /tmp/old/ovm_exporter.py')
    parser.add_argument('--keep', action='store_true',
                        help='keep the servers up at the end until Enter (for profiling)')
    args = parser.parse_args()
    start_server_bench(('wrk', 'mkfs.xfs', 'openssl'))
    pythons = bench_pythons(args.python)
    size = args.size_mib * MiB
    bd.ensure_nginx()
    folder = tempfile.mkdtemp(prefix='ovm-bench-requests-')
    mount = manager = None
    servers = []
    try:
        certs = bd.ox.make_certificates(folder)
        mount = LoopMount(folder, MKFS_XFS_REFLINK, max(4 << 30, 2 * size + (2 << 30)))
        repositories = bd.make_repositories(mount.path, len(pythons), size)
        bd.ManagerHandler.do_GET = CrowdManager.do_GET
        manager = bd.start_manager(certs)
        manager_url = 'https://127.0.0.1:%d' % manager.server_address[1]
        exporters, files = [], []
        for index, python in enumerate(pythons):
            exporter = bd.Exporter(os.path.join(folder, 'exporter%d' % index), python, certs,
                                   manager_url, repositories[index])
            exporter.start()
            servers.append(exporter)
            files.append(exporter.prepare())
            exporters.append(exporter)
            log('exporter %s on port %d' % (exporter.interpreter, exporter.port))
        for path in files:
            bd.read_through(path)
        root, name = os.path.split(files[0])
        nginx = bd.Nginx(os.path.join(folder, 'nginx-1'), '1', certs, root, name)
        nginx.start()
        servers.append(nginx)
        order = [nginx] + exporters
        runs = []
        for block in [int(b) for b in args.ranges.split(',')]:
            for conns in [int(c) for c in args.conns.split(',')]:
                runs.append((block, conns, False))
        if not args.no_new_tls:
            runs += [(65536, conns, True) for conns in [int(c) for c in args.conns.split(',')]]
        results = {}  # (server, block, conns, close) -> [(requests/s, CPU us/request)]
        for round_number in range(args.rounds):
            for block, conns, close in runs:
                for server in order:
                    rate, cpu = wrk(server, folder, size, block, conns, args.seconds, close)
                    results.setdefault((id(server), block, conns, close), []).append(
                        (rate, cpu))
                    log('round %d: %s %s: %d B x %d conns%s: %.0f requests/s, %.0f us CPU '
                        'each' % (round_number + 1, server.label, server.interpreter, block,
                                  conns, ' (new TLS each)' if close else '', rate, cpu))
        downloads = []
        if args.client_chunks:
            downloads = client_downloads(folder, mount.path, certs, manager_url, args.client_chunks,
                                         (args.client or []) + [EXPORTER])
        crowds = {}
        if not args.no_crowd:
            for exporter in exporters:
                crowds[id(exporter)] = crowd(exporter, args.idle, args.stalled, args.slowloris)
                log('crowd %s: %r' % (exporter.interpreter, crowds[id(exporter)]))
        print()
        print('Random aligned ranges over TLS on 127.0.0.1 (wrk, 1 thread, %ds each, %d rounds), '
              'requests/s (median); ratio to nginx with 1 worker in the same round (lowest-'
              'highest); server CPU microseconds per request (median)'
              % (args.seconds, args.rounds))
        header = '%-9s %-28s %9s %6s %10s %11s %8s' % ('server', 'interpreter', 'range',
                                                        'conns', 'req/s', 'ratio', 'CPU us')
        print(header)
        print('-' * len(header))
        for block, conns, close in runs:
            reference = results[(id(nginx), block, conns, close)]
            for server in order:
                measured = results[(id(server), block, conns, close)]
                ratios = [m[0] / r[0] for m, r in zip(measured, reference)]
                print('%-9s %-28s %9s %6s %10.0f %11s %8.0f' % (
                    server.label, server.interpreter,
                    '%dK%s' % (block // 1024, ' new' if close else ''), conns,
                    median([m[0] for m in measured]),
                    '%.2f-%.2f' % (min(ratios), max(ratios)) if len(ratios) > 1
                    else '%.2f' % ratios[0], median([m[1] for m in measured])))
        if crowds:
            print()
            print('Crowd: %d idle TCP, %d stalled handshakes, %d slowloris heads open; a new '
                  'client logs in and reads 1 MiB' % (args.idle, args.stalled, args.slowloris))
            for exporter in exporters:
                c = crowds[id(exporter)]
                print('%-28s alone %s s, 16 at once %.2f s (%d failed), server %.0f MiB RSS, '
                      '%d descriptors; %d slowloris connections refused' % (
                          exporter.interpreter, '%.2f' % c['alone'] if c['alone'] else 'FAILED',
                          c['sixteen'], c['failed'], c['rss_mib'], c['fds'], c['refused']))
        if downloads:
            print()
            print('client download of a disk of %d separate 4 KiB chunks (python3 client and '
                  'server; requests counted in the access log, log_level info)'
                  % args.client_chunks)
            for script, seconds, requests in downloads:
                print('%-40s %7.1f s %8d requests' % (script, seconds, requests))
        for exporter in exporters:
            if 'Traceback' in exporter.log():
                log('exporter %s logged a traceback:\n%s' % (exporter.interpreter,
                                                             exporter.log()))
        sys.stdout.flush()
        if args.keep:
            for server in order:
                print('%s %s pid %d: %s %s' % (server.label, server.interpreter,
                                               server.process.pid, server.url,
                                               getattr(server, 'token', '')))
            input('servers kept up; press Enter to stop and clean up ')
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as exc:  # keep cleaning up
                log('stopping: %s' % exc)
        if manager is not None:
            manager.shutdown()
        if mount is not None:
            mount.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
