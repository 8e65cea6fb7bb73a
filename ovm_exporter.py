#!/usr/bin/env python
# -*- coding: utf-8 -*-
"""ovm_exporter: crash-consistent disk snapshots and incremental exports for Oracle VM.

Copy this one file onto an Oracle VM Server (dom0) and run it. It lists the host's virtual
machines (from the ovs-agent databases and each repository's vm.cfg files), takes
copy-on-write snapshots of their disks (OCFS2 reflinks, or FICLONE on XFS/btrfs), tells a
backup or migration client which byte ranges of a snapshot hold data or changed since an
earlier snapshot, and serves those bytes over authenticated HTTPS with HTTP Range.

It is a drop-in replacement for the Go service "coriolis-ovm-exporter": same configuration
file, port, routes, JSON and tokens.

    python ovm_exporter.py serve --config /etc/coriolis-ovm-exporter/config.toml
    python ovm_exporter.py vms --config FILE [--json]    # what discovery sees on this host
    python ovm_exporter.py check-config --config FILE    # validate, print without secrets
    python ovm_exporter.py demo                          # sample host, no OVM or root needed
    python ovm_exporter.py client --url https://host:5544 --cacert ca.pem vms
    python ovm_exporter.py --version

Install it as a service with install.sh (beside this file); README.md has the whole story.

Standard library only; runs unchanged on Python 2.6 (the dom0's) and on Python 3.6-3.13.
"""

from __future__ import print_function

import array
import ast
import base64
import binascii
import bisect
import collections
import errno
import fcntl
import hashlib
import hmac
import io
import itertools
import json
import logging
import logging.handlers
import math
import numbers
import operator
import optparse
import os
import posixpath
import pickle
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings

__version__ = '1.0.0'

# ------------------------------------------------------------------ compatibility prelude ---

PY2 = sys.version_info[0] == 2

if PY2:  # `novm`: tells the vermin checker these lines only run on Python 2
    import BaseHTTPServer as http_server  # novm
    import httplib as http_client  # novm
    import urllib2 as urllib_request  # novm
    from urllib import unquote as url_unquote  # novm
    from urlparse import parse_qs, urlsplit  # novm
    text_type = unicode  # novm (noqa: F821)
    string_types = (str, unicode)  # novm (noqa: F821)
    integer_types = (int, long)  # novm (noqa: F821)
    text_chr = unichr  # novm (noqa: F821)
else:
    import http.client as http_client  # novm
    import http.server as http_server  # novm
    import urllib.request as urllib_request  # novm
    from urllib.parse import parse_qs, urlsplit  # novm
    from urllib.parse import unquote as url_unquote  # novm
    text_type = str
    string_types = (str,)
    integer_types = (int,)
    text_chr = chr

# Feature flags: every test of what this Python or kernel has, in one place.
izip = getattr(itertools, 'izip', zip)
compress = getattr(itertools, 'compress', None)     # Python 2.7+
O_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)
os_pread = getattr(os, 'pread', None)               # Python 3.3+
# hmac.compare_digest exists from 2.7.7 / 3.3; Python 2.6 uses the pure-Python fallback.
# Tests set this to None to force the fallback.
HMAC_COMPARE_DIGEST = getattr(hmac, 'compare_digest', None)
# True where ssl.SSLContext exists (2.7.9+, every 3.x). Tests set it to False to force the
# Python 2.6 code path (ssl.wrap_socket) on interpreters that still have ssl.wrap_socket.
HAVE_SSLCONTEXT = hasattr(ssl, 'SSLContext')
HAVE_SNI = getattr(ssl, 'HAS_SNI', False)


log = logging.getLogger('ovm_exporter')
BytesIO = io.BytesIO


def to_bytes(value, encoding='utf-8'):
    if isinstance(value, bytes):
        return value
    return value.encode(encoding)


def to_text(value, fallback=None):
    """Text from text, bytes (UTF-8 with undecodable bytes replaced; given a `fallback`
    encoding, bytes that are not UTF-8 are decoded with it instead), None (u'') or anything
    else (an exception too, whose Python 2 message may not be ASCII)."""
    if isinstance(value, text_type):
        return value
    if value is None:
        return u''
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode('utf-8', 'strict' if fallback else 'replace')
        except UnicodeDecodeError:
            return bytes(value).decode(fallback)
    try:
        return text_type(value)
    except UnicodeError:
        return to_text(str(value))


def to_native(value, errors='strict'):
    """ASCII text or bytes -> the native str type of this Python; errors='backslashreplace'
    for messages that may hold other characters (Python 2)."""
    if PY2 and isinstance(value, text_type):
        return value.encode('ascii', errors)
    if not PY2 and isinstance(value, bytes):
        return value.decode('ascii', errors)
    return value


def _array_tobytes(arr):
    if hasattr(arr, 'tobytes'):
        return arr.tobytes()
    return arr.tostring()


def _array_frombytes(arr, data):
    if hasattr(arr, 'frombytes'):
        arr.frombytes(data)
    else:
        arr.fromstring(data)


def _path_to_bytes(path):
    if isinstance(path, bytes):
        return path
    fsencode = getattr(os, 'fsencode', None)
    if fsencode is not None:
        return fsencode(path)
    return path.encode(sys.getfilesystemencoding() or 'utf-8')


def text_repr(value):
    """repr() for messages, the same on every Python: no u prefix on Python 2's text."""
    if isinstance(value, (list, tuple)):
        inner = ', '.join([text_repr(item) for item in value])
        return ('[%s]' if isinstance(value, list) else '(%s)') % inner
    text = repr(value)
    if PY2 and isinstance(value, text_type) and text.startswith('u'):
        text = text[1:]
    return text


def json_dumps(obj):
    return json.dumps(obj, separators=(',', ':'), sort_keys=False)


JSON_MAX_DEPTH = 32
# The closing quote is optional: an unterminated string ends the text in one match (with a
# required quote, every escaped quote would start a new scan to the end: quadratic).
_JSON_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?')
_JSON_BRACKET_RE = re.compile(r'[\[\]{}]')


def json_loads_bounded(text, max_depth=JSON_MAX_DEPTH):
    """json.loads for untrusted text whose arrays/objects nest at most max_depth deep.

    Deeper input raises ValueError before the (recursive) decoder sees it. Brackets inside
    strings do not count; an unterminated string runs to the end of the text, where the
    decoder stops at it without nesting further."""
    depth = 0
    for match in _JSON_BRACKET_RE.finditer(_JSON_STRING_RE.sub('""', text)):
        if match.group() in '[{':
            depth += 1
            if depth > max_depth:
                raise ValueError('JSON nested deeper than %d levels' % max_depth)
        elif depth:
            depth -= 1
    return json.loads(text)


def legacy_handshake(tls):
    """Finish the handshake of a socket from ssl.wrap_socket(do_handshake_on_connect=False).
    Python 2.6's own handshake-on-connect clears the socket's time-out for the handshake;
    this one keeps it, so a client or Manager that stalls cannot hold a thread forever."""
    tls.do_handshake()
    return tls


_IPV4_ADDRESS_RE = re.compile(r'^[0-9]+(\.[0-9]+){3}$')


def client_tls(sock, host, ca_file=None, verify=True):
    """The client side of TLS on a connected socket (the OVM Manager check, the client, the
    self-test), handshake done. With `verify` the chain is checked against ca_file (without
    one: the system's CAs); never the name, which each caller checks its own way."""
    if HAVE_SSLCONTEXT:
        context = ssl.SSLContext(getattr(ssl, 'PROTOCOL_TLS_CLIENT', ssl.PROTOCOL_SSLv23))  # novm
        context.options |= getattr(ssl, 'OP_NO_SSLv2', 0) | getattr(ssl, 'OP_NO_SSLv3', 0)
        context.check_hostname = False  # novm (2.7.9+, 3.4+); must precede verify_mode
        context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
        if verify and ca_file:
            context.load_verify_locations(cafile=ca_file)
        elif verify:
            context.load_default_certs()  # novm
        kwargs = {}
        if HAVE_SNI and host and ':' not in host and not _IPV4_ADDRESS_RE.match(host):
            kwargs['server_hostname'] = host
        return context.wrap_socket(sock, **kwargs)
    if verify:  # Python 2.6
        options = dict(cert_reqs=ssl.CERT_REQUIRED, ca_certs=ca_file)
    else:
        options = dict(cert_reqs=ssl.CERT_NONE)
    return legacy_handshake(getattr(ssl, 'wrap_socket')(
        sock, ssl_version=ssl.PROTOCOL_SSLv23, do_handshake_on_connect=False, **options))


# ------------------------------------------------------ TOML config parser, Go durations ---
# A TOML 1.0 subset parser (everything but dates and times) for the config file, because
# Python 2.6 has no TOML parser and tomllib only exists from 3.11 on. For every document it
# accepts, the result is the same as tomllib.loads() (same dicts, lists, unicode strings, ints,
# floats, bools); the rules about redefining tables follow tomllib's (MIT, Taneli Hukkinen).
# Also Go's time.ParseDuration, for durations such as "168h" in the config.


_TOML_MAX_NESTING = 100

_TOML_WS = u' \t'
_TOML_WS_NL = u' \t\n'
_TOML_BARE_KEY_CHARS = frozenset(
    u'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_')
_TOML_KEY_START = _TOML_BARE_KEY_CHARS | frozenset(u'"\'')
_TOML_HEX_DIGITS = frozenset(u'0123456789abcdefABCDEF')
_TOML_CTRL = frozenset(text_chr(code) for code in list(range(32)) + [127])
# Characters not allowed raw in one-line strings and comments, and in multi-line strings.
_TOML_ILLEGAL_LINE = _TOML_CTRL - frozenset(u'\t')
_TOML_ILLEGAL_MULTILINE = _TOML_CTRL - frozenset(u'\t\n')
_TOML_ESCAPES = {
    u'b': u'\b', u't': u'\t', u'n': u'\n', u'f': u'\f', u'r': u'\r', u'"': u'"', u'\\': u'\\',
}
_TOML_NUMBER_RE = re.compile(
    r'0(?:x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|b[01](?:_?[01])*|o[0-7](?:_?[0-7])*)'
    r'|[+-]?(?:0|[1-9](?:_?[0-9])*)'
    r'(?P<frac>(?:\.[0-9](?:_?[0-9])*)?(?:[eE][+-]?[0-9](?:_?[0-9])*)?)')
# Anything that starts like a date (1979-05-27) or a time (07:32): not supported here.
_TOML_DATETIME_RE = re.compile(r'[0-9]{4}-[0-9]{2}|[0-9]{2}:[0-9]{2}')
_TOML_TOKEN_RE = re.compile(r'[^\s,\[\]{}#=]+')
_TOML_BARE_KEY_RE = re.compile(r'^[A-Za-z0-9_-]+$')
_TOML_FROZEN = 0      # an inline table or array: nothing may be added to it later
_TOML_EXPLICIT = 1    # a table defined by a [header] or by dotted keys: no [header] for it later


class ConfigError(Exception):
    """A config file that cannot be used. str(e) is the whole message, e.g.
    "config.toml line 7: key 'api.port': expected a value, found 'abc'".
    Attributes: source, line (int or None), key (dotted text or None), reason."""

    def __init__(self, message, source=None, line=None, key=None, reason=None):
        Exception.__init__(self, to_native(message, 'backslashreplace'))
        self.source = source
        self.line = line
        self.key = key
        self.reason = reason if reason is not None else message


def _toml_printable(text):
    """Text for an error message: control characters escaped."""
    out = []
    for ch in text:
        if ch in _TOML_CTRL:
            out.append(u'\\x%02x' % ord(ch))
        else:
            out.append(ch)
    return u''.join(out)


def _toml_format_key(parts):
    """('api', 'tls', 'key') -> u'api.tls.key'; parts that are not bare keys are quoted."""
    out = []
    for part in parts:
        if _TOML_BARE_KEY_RE.match(part):
            out.append(part)
        else:
            out.append(u'"' + _toml_printable(part.replace(u'\\', u'\\\\')
                                              .replace(u'"', u'\\"')) + u'"')
    return u'.'.join(out)


def _toml_error_message(source, line, key, reason):
    head = to_text(source)
    if line is not None:
        head = u'%s line %d' % (head, line)
    if key:
        return u"%s: key '%s': %s" % (head, key, reason)
    return u'%s: %s' % (head, reason)


class _TomlNestError(Exception):
    """Internal: the path up to `key` holds a value that is not a table."""

    def __init__(self, key):
        Exception.__init__(self)
        self.key = key


class _TomlFlags(object):
    """Which tables were defined how (tomllib's rules). A tree keyed by key parts; each
    node is (flags, recursive_flags, children). Array-of-tables indices are not part of
    the keys: a new [[x]] element clears the flags below x."""

    def __init__(self):
        self.tree = {}
        self.pending = []

    def add_pending(self, key, flag):
        self.pending.append((key, flag))

    def finalize_pending(self):
        for key, flag in self.pending:
            self.set(key, flag, False)
        self.pending = []

    def unset_all(self, key):
        cont = self.tree
        for part in key[:-1]:
            if part not in cont:
                return
            cont = cont[part][2]
        cont.pop(key[-1], None)

    def set(self, key, flag, recursive):
        cont = self.tree
        for part in key[:-1]:
            if part not in cont:
                cont[part] = (set(), set(), {})
            cont = cont[part][2]
        if key[-1] not in cont:
            cont[key[-1]] = (set(), set(), {})
        cont[key[-1]][1 if recursive else 0].add(flag)

    def has(self, key, flag):
        if not key:
            return False
        cont = self.tree
        for part in key[:-1]:
            if part not in cont:
                return False
            node = cont[part]
            if flag in node[1]:
                return True
            cont = node[2]
        node = cont.get(key[-1])
        if node is None:
            return False
        return flag in node[0] or flag in node[1]


def _toml_get_or_create_nest(root, key, access_lists):
    cont = root
    for i in range(len(key)):
        part = key[i]
        if part not in cont:
            cont[part] = {}
        cont = cont[part]
        if access_lists and isinstance(cont, list) and cont:
            cont = cont[-1]
        if not isinstance(cont, dict):
            raise _TomlNestError(key[:i + 1])
    return cont


class _TomlParser(object):

    def __init__(self, text, source):
        # TOML allows reading CRLF as LF everywhere, also inside strings (tomllib does).
        self.src = text.replace(u'\r\n', u'\n')
        self.end = len(self.src)
        self.pos = 0
        self.source = source
        self.data = {}
        self.flags = _TomlFlags()
        self.errkey = None
        self.depth = 0

    # ------------------------------------------------------------------ errors
    def line_of(self, pos):
        if pos >= self.end:
            pos = self.end
            if self.src.endswith(u'\n'):
                pos -= 1
        return self.src.count(u'\n', 0, max(pos, 0)) + 1

    def error(self, reason, pos=None):
        if pos is None:
            pos = self.pos
        line = self.line_of(pos)
        key = None
        if self.errkey:
            key = _toml_format_key(self.errkey)
        return ConfigError(_toml_error_message(self.source, line, key, reason),
                           source=self.source, line=line, key=key, reason=reason)

    def found(self, pos=None):
        if pos is None:
            pos = self.pos
        if pos >= self.end:
            return u'end of file'
        ch = self.src[pos]
        if ch == u'\n':
            return u'end of line'
        match = _TOML_TOKEN_RE.match(self.src, pos)
        token = match.group() if match else ch
        if len(token) > 40:
            token = token[:40] + u'...'
        return u"'" + _toml_printable(token) + u"'"

    # ------------------------------------------------------------------ skipping
    def skip_ws(self):
        src, pos, end = self.src, self.pos, self.end
        while pos < end and src[pos] in _TOML_WS:
            pos += 1
        self.pos = pos

    def skip_comment(self):
        src, pos, end = self.src, self.pos, self.end
        if pos < end and src[pos] == u'#':
            pos += 1
            while pos < end and src[pos] != u'\n':
                if src[pos] in _TOML_ILLEGAL_LINE:
                    raise self.error(u'control character U+%04X is not allowed in a comment'
                                     % ord(src[pos]), pos)
                pos += 1
            self.pos = pos

    def skip_array_space(self):
        while True:
            before = self.pos
            src, pos, end = self.src, self.pos, self.end
            while pos < end and src[pos] in _TOML_WS_NL:
                pos += 1
            self.pos = pos
            self.skip_comment()
            if self.pos == before:
                return

    # ------------------------------------------------------------------ document
    def parse(self):
        src = self.src
        header = ()
        while True:
            self.errkey = None
            self.skip_ws()
            if self.pos >= self.end:
                break
            ch = src[self.pos]
            if ch == u'\n':
                self.pos += 1
                continue
            what = u'comment'
            if ch in _TOML_KEY_START:
                self.key_value_statement(header)
                what = u'value'
            elif ch == u'[':
                self.flags.finalize_pending()
                if src.startswith(u'[[', self.pos):
                    header = self.array_table_header()
                else:
                    header = self.table_header()
                what = u'table header'
            elif ch != u'#':
                raise self.error(u'expected a key, a [table] header or a comment, found '
                                 + self.found())
            self.skip_ws()
            self.skip_comment()
            if self.pos >= self.end:
                break
            if src[self.pos] != u'\n':
                raise self.error(u'expected end of line after the %s, found %s'
                                 % (what, self.found()))
            self.pos += 1
        return self.data

    def _header_key(self, opening):
        start = self.pos
        self.pos += len(opening)
        self.skip_ws()
        key = self.parse_key()
        self.errkey = key
        return start, key, _toml_format_key(key)

    def _header_end(self, closing, what):
        if not self.src.startswith(closing, self.pos):
            raise self.error(u"expected '%s' at the end of the %s header, found %s"
                             % (closing, what, self.found()))
        self.pos += len(closing)

    def table_header(self):
        start, key, name = self._header_key(u'[')
        if self.flags.has(key, _TOML_FROZEN):
            raise self.error(u'table [%s] cannot be opened: it is already defined as an '
                             u'inline table or array' % name, start)
        if self.flags.has(key, _TOML_EXPLICIT):
            raise self.error(u'table [%s] is defined twice' % name, start)
        self.flags.set(key, _TOML_EXPLICIT, False)
        try:
            _toml_get_or_create_nest(self.data, key, True)
        except _TomlNestError as exc:
            raise self.error(u'table [%s] cannot be opened: %s is already defined as a value'
                             % (name, _toml_format_key(exc.key)), start)
        self._header_end(u']', u'table')
        return key

    def array_table_header(self):
        start, key, name = self._header_key(u'[[')
        if self.flags.has(key, _TOML_FROZEN):
            raise self.error(u'array of tables [[%s]] cannot be extended: it is already '
                             u'defined as an inline table or array' % name, start)
        self.flags.unset_all(key)
        self.flags.set(key, _TOML_EXPLICIT, False)
        try:
            cont = _toml_get_or_create_nest(self.data, key[:-1], True)
            if key[-1] not in cont:
                cont[key[-1]] = [{}]
            elif isinstance(cont[key[-1]], list):
                cont[key[-1]].append({})
            else:
                raise _TomlNestError(key)
        except _TomlNestError as exc:
            raise self.error(u'array of tables [[%s]] cannot be opened: %s is already defined'
                             u' as a table or value' % (name, _toml_format_key(exc.key)), start)
        self._header_end(u']]', u'array of tables')
        return key

    def key_value_statement(self, header):
        start = self.pos
        key, value = self.parse_key_value(header)
        parent, stem = key[:-1], key[-1]
        for i in range(1, len(key)):
            cont_key = header + key[:i]
            if self.flags.has(cont_key, _TOML_EXPLICIT):
                raise self.error(u'cannot add keys to table [%s] with a dotted key: it is '
                                 u'defined elsewhere' % _toml_format_key(cont_key), start)
            self.flags.add_pending(cont_key, _TOML_EXPLICIT)
        if self.flags.has(header + parent, _TOML_FROZEN):
            raise self.error(u'cannot add keys to %s: it is an inline table or array'
                             % _toml_format_key(header + parent), start)
        try:
            nest = _toml_get_or_create_nest(self.data, header + parent, True)
        except _TomlNestError as exc:
            raise self.error(u'%s is already defined as a value, not a table'
                             % _toml_format_key(exc.key), start)
        if stem in nest:
            raise self.error(u'duplicate key: it is already defined', start)
        if isinstance(value, (dict, list)):
            self.flags.set(header + key, _TOML_FROZEN, True)
        nest[stem] = value

    def parse_key_value(self, prefix):
        """key = value; sets self.errkey to prefix + key (for messages)."""
        key = self.parse_key()
        self.errkey = prefix + key
        if not self.src.startswith(u'=', self.pos):
            raise self.error(u"expected '=' after the key, found " + self.found())
        self.pos += 1
        self.skip_ws()
        return key, self.parse_value()

    def parse_key(self):
        parts = [self.parse_key_part()]
        self.skip_ws()
        while self.src.startswith(u'.', self.pos):
            self.pos += 1
            self.skip_ws()
            parts.append(self.parse_key_part())
            self.skip_ws()
        return tuple(parts)

    def parse_key_part(self):
        src, pos, end = self.src, self.pos, self.end
        ch = src[pos] if pos < end else u''
        if ch and ch in _TOML_BARE_KEY_CHARS:
            first = pos
            while pos < end and src[pos] in _TOML_BARE_KEY_CHARS:
                pos += 1
            self.pos = pos
            return src[first:pos]
        if ch == u"'":
            return self.parse_literal_string()
        if ch == u'"':
            return self.parse_basic_string()
        raise self.error(u'expected a key, found ' + self.found())

    # ------------------------------------------------------------------ values
    def parse_value(self):
        src, pos = self.src, self.pos
        ch = src[pos] if pos < self.end else u''
        if ch == u'"':
            if src.startswith(u'"""', pos):
                return self.parse_multiline_string(u'"')
            return self.parse_basic_string()
        if ch == u"'":
            if src.startswith(u"'''", pos):
                return self.parse_multiline_string(u"'")
            return self.parse_literal_string()
        if ch == u't' and src.startswith(u'true', pos):
            self.pos += 4
            return self.value_end(pos, True, u'expected a value')
        if ch == u'f' and src.startswith(u'false', pos):
            self.pos += 5
            return self.value_end(pos, False, u'expected a value')
        if ch == u'[' or ch == u'{':
            if self.depth >= _TOML_MAX_NESTING:
                raise self.error(u'arrays and inline tables nested more than %d deep'
                                 % _TOML_MAX_NESTING)
            self.depth += 1
            try:
                if ch == u'[':
                    return self.parse_array()
                return self.parse_inline_table()
            finally:
                self.depth -= 1
        if _TOML_DATETIME_RE.match(src, pos):
            raise self.error(u'dates and times are not supported, found %s (write it as a '
                             u'quoted string)' % self.found())
        match = _TOML_NUMBER_RE.match(src, pos)
        if match:
            text = match.group()
            self.pos = match.end()
            if text[:2] in (u'0x', u'0o', u'0b'):
                value = int(text[2:].replace(u'_', u''), {u'x': 16, u'o': 8, u'b': 2}[text[1]])
            elif match.group('frac'):
                value = float(text.replace(u'_', u''))
            else:
                value = int(text.replace(u'_', u''))
            return self.value_end(pos, value, u'invalid number')
        for special in (u'inf', u'nan', u'+inf', u'+nan', u'-inf', u'-nan'):
            if src.startswith(special, pos):
                self.pos += len(special)
                # An explicit sign bit: Python 2's float('nan') is negative on x86.
                value = math.copysign(float(special.lstrip(u'+-')),
                                      -1.0 if special[0] == u'-' else 1.0)
                return self.value_end(pos, value, u'expected a value')
        raise self.error(u'expected a value, found ' + self.found())

    def value_end(self, start, value, reason):
        """A bare value (number, bool) must not run on into more word characters:
        '05544', '1.', '1_000_', 'truex' are errors (as in tomllib); say so clearly."""
        if self.pos < self.end and (self.src[self.pos] in _TOML_BARE_KEY_CHARS
                                    or self.src[self.pos] in u'.+'):
            reason = u'%s, found %s' % (reason, self.found(start))
            if _TOML_NUMBER_RE.match(self.src, start) and re.match(
                    r'[+-]?0[0-9_]', self.src[start:start + 3]):
                reason += u' (leading zeros are not allowed)'
            raise self.error(reason, start)
        return value

    def parse_array(self):
        start = self.pos
        self.pos += 1
        result = []
        self.skip_array_space()
        if self.src.startswith(u']', self.pos):
            self.pos += 1
            return result
        while True:
            if self.pos >= self.end:
                raise self.error(u"unterminated array (no closing ']')", start)
            result.append(self.parse_value())
            self.skip_array_space()
            ch = self.src[self.pos:self.pos + 1]
            if ch == u']':
                self.pos += 1
                return result
            if ch != u',':
                if not ch:
                    raise self.error(u"unterminated array (no closing ']')", start)
                raise self.error(u"expected ',' or ']' in the array, found " + self.found())
            self.pos += 1
            self.skip_array_space()
            if self.src.startswith(u']', self.pos):
                self.pos += 1
                return result

    def parse_inline_table(self):
        self.pos += 1
        outer_key = self.errkey or ()
        table = {}
        flags = _TomlFlags()
        self.skip_ws()
        if self.src.startswith(u'}', self.pos):
            self.pos += 1
            return table
        while True:
            self.errkey = outer_key
            if self.pos >= self.end or self.src[self.pos] == u'\n':
                raise self.error(u'an inline table must be on one line: expected a key, found '
                                 + self.found())
            start = self.pos
            key, value = self.parse_key_value(outer_key)
            parent, stem = key[:-1], key[-1]
            if flags.has(key, _TOML_FROZEN):
                raise self.error(u'cannot add keys to %s: it is an inline table or array'
                                 % _toml_format_key(outer_key + parent), start)
            try:
                nest = _toml_get_or_create_nest(table, parent, False)
            except _TomlNestError as exc:
                raise self.error(u'%s is already defined as a value, not a table'
                                 % _toml_format_key(outer_key + exc.key), start)
            if stem in nest:
                raise self.error(u'duplicate key: it is already defined', start)
            nest[stem] = value
            self.skip_ws()
            ch = self.src[self.pos:self.pos + 1]
            if ch == u'}':
                self.pos += 1
                self.errkey = outer_key
                return table
            if ch != u',':
                raise self.error(u"expected ',' or '}' in the inline table, found "
                                 + self.found())
            if isinstance(value, (dict, list)):
                flags.set(key, _TOML_FROZEN, True)
            self.pos += 1
            self.skip_ws()

    # ------------------------------------------------------------------ strings
    def bad_char(self, pos, what):
        return self.error(u'control character U+%04X is not allowed in %s (use an escape)'
                          % (ord(self.src[pos]), what), pos)

    def parse_literal_string(self):
        start = self.pos
        src, pos, end = self.src, self.pos + 1, self.end
        while True:
            if pos >= end or src[pos] == u'\n':
                raise self.error(u"unterminated string: a '...' string must end on the same"
                                 u" line", start)
            ch = src[pos]
            if ch == u"'":
                self.pos = pos + 1
                return src[start + 1:pos]
            if ch in _TOML_ILLEGAL_LINE:
                raise self.bad_char(pos, u'a string')
            pos += 1

    def parse_basic_string(self):
        """A "..." string (self.pos at the quote)."""
        return self.parse_escaped(self.pos + 1, False, self.pos)

    def parse_multiline_string(self, delim):
        start = self.pos
        src = self.src
        pos = start + 3
        if src.startswith(u'\n', pos):
            pos += 1
        if delim == u'"':
            text = self.parse_escaped(pos, True, start)
        else:
            end = self.end
            first = pos
            while True:
                if pos >= end:
                    raise self.error(u"unterminated ''' string (no closing ''')", start)
                if src.startswith(u"'''", pos):
                    text = src[first:pos]
                    self.pos = pos + 3
                    break
                if src[pos] in _TOML_ILLEGAL_MULTILINE:
                    raise self.bad_char(pos, u'a string')
                pos += 1
        # A closing delimiter of 4 or 5 quotes: the first one or two belong to the string.
        for _extra in (1, 2):
            if src.startswith(delim, self.pos):
                text += delim
                self.pos += 1
        return text

    def parse_escaped(self, pos, multiline, start):
        """Body of a basic string from pos to its closing quote(s); sets self.pos after them."""
        src, end = self.src, self.end
        illegal = _TOML_ILLEGAL_MULTILINE if multiline else _TOML_ILLEGAL_LINE
        parts = []
        seg = pos
        while True:
            if pos >= end:
                if multiline:
                    raise self.error(u'unterminated """ string (no closing """)', start)
                raise self.error(u'unterminated string', start)
            ch = src[pos]
            if ch == u'"':
                if not multiline:
                    parts.append(src[seg:pos])
                    self.pos = pos + 1
                    return u''.join(parts)
                if src.startswith(u'"""', pos):
                    parts.append(src[seg:pos])
                    self.pos = pos + 3
                    return u''.join(parts)
                pos += 1
            elif ch == u'\\':
                parts.append(src[seg:pos])
                pos = self.parse_escape(pos, multiline, parts)
                seg = pos
            elif ch in illegal:
                if ch == u'\n':
                    raise self.error(u'unterminated string: a "..." string must end on the '
                                     u'same line (use """ for several lines)', start)
                raise self.bad_char(pos, u'a string')
            else:
                pos += 1

    def parse_escape(self, pos, multiline, parts):
        src, end = self.src, self.end
        code = src[pos + 1:pos + 2]
        if multiline and code in (u' ', u'\t', u'\n'):
            # Line-ending backslash: drop the newline and all whitespace after it.
            pos += 1
            while pos < end and src[pos] in _TOML_WS:
                pos += 1
            if pos >= end:
                return pos
            if src[pos] != u'\n':
                raise self.error(u"a '\\' followed by spaces must end the line in a \"\"\" "
                                 u"string", pos)
            while pos < end and src[pos] in _TOML_WS_NL:
                pos += 1
            return pos
        if code in _TOML_ESCAPES:
            parts.append(_TOML_ESCAPES[code])
            return pos + 2
        if code in (u'u', u'U'):
            size = 4 if code == u'u' else 8
            digits = src[pos + 2:pos + 2 + size]
            if len(digits) != size or not _TOML_HEX_DIGITS.issuperset(digits):
                raise self.error(u'invalid escape: \\%s needs %d hex digits' % (code, size), pos)
            value = int(digits, 16)
            if not (0 <= value <= 0xD7FF or 0xE000 <= value <= 0x10FFFF):
                raise self.error(u'invalid escape \\%s%s: not a Unicode scalar value'
                                 % (code, digits), pos)
            if value > sys.maxunicode:
                # Narrow Python 2 build: a surrogate pair, as decoding UTF-8 would give.
                value -= 0x10000
                parts.append(text_chr(0xD800 + (value >> 10))
                             + text_chr(0xDC00 + (value & 0x3FF)))
            else:
                parts.append(text_chr(value))
            return pos + 2 + size
        raise self.error(u"invalid escape '\\%s' in string (valid: \\b \\t \\n \\f \\r \\\" "
                         u"\\\\ \\uXXXX \\UXXXXXXXX)" % _toml_printable(code), pos)


def parse_toml(text, source='<string>'):
    """Parse a TOML document (unicode text; UTF-8 bytes are decoded) into a dict.

    Supports TOML 1.0 except dates and times (rejected with a ConfigError). Results equal
    tomllib.loads(); strings and keys are unicode on Python 2. Raises ConfigError naming the
    source, the line and the key."""
    if isinstance(text, bytes) and not isinstance(text, text_type):
        try:
            text = text.decode('utf-8')
        except UnicodeDecodeError as exc:
            line = text.count(b'\n', 0, exc.start) + 1
            raise ConfigError(_toml_error_message(source, line, None, u'not valid UTF-8'),
                              source=source, line=line, reason=u'not valid UTF-8')
    if not isinstance(text, text_type):
        raise TypeError('parse_toml() needs text, not %s' % type(text).__name__)
    return _TomlParser(text, source).parse()


def load_toml_file(path, limit=1024 * 1024):
    """Read a UTF-8 TOML file of at most `limit` bytes (a leading BOM is ignored) and parse
    it; ConfigError when the file cannot be read, is too large, is not UTF-8 or not TOML."""
    try:
        handle = open(path, 'rb')
        try:
            data = handle.read(limit + 1)
        finally:
            handle.close()
    except (IOError, OSError) as exc:
        reason = u'cannot read the file: %s' % to_text(exc.strerror or exc)
        raise ConfigError(_toml_error_message(path, None, None, reason), source=path,
                          reason=reason)
    if len(data) > limit:
        reason = u'larger than %d bytes; not a configuration file' % limit
        raise ConfigError(_toml_error_message(path, None, None, reason), source=path,
                          reason=reason)
    if data.startswith(b'\xef\xbb\xbf'):
        data = data[3:]
    return parse_toml(data, source=path)


# ------------------------------------------------------------------------- Go durations
_GO_DURATION_UNITS = {
    u'ns': 1, u'us': 1000, u'\u00b5s': 1000, u'\u03bcs': 1000, u'ms': 1000000,
    u's': 1000000000, u'm': 60 * 1000000000, u'h': 3600 * 1000000000,
}
_GO_DURATION_MAX = 1 << 63


def _go_duration_nanoseconds(text):
    """Go's time.ParseDuration, step by step (same accepted syntax, same rounding,
    same overflow limits), returning an int number of nanoseconds."""
    if PY2 and isinstance(text, bytes):
        try:
            text = text.decode('utf-8')
        except UnicodeDecodeError:
            raise ValueError('invalid duration %s: not UTF-8 text' % text_repr(text))
    if not isinstance(text, text_type):
        raise ValueError('a duration must be a string such as "168h" or "1h30m", not %s'
                         % type(text).__name__)
    quoted = u'"' + _toml_printable(text) + u'"'
    hint = u' (expected a number and a unit for each part, e.g. "168h", "90m", "1h30m",' \
           u' "300ms"; units: ns, us, ms, s, m, h)'
    invalid = u'invalid duration ' + quoted + hint
    rest = text
    negative = False
    if rest[:1] in (u'-', u'+'):
        negative = rest[:1] == u'-'
        rest = rest[1:]
    if rest == u'0':
        return 0
    if not rest:
        raise ValueError(to_native(invalid, 'backslashreplace'))
    digits = u'0123456789'
    total = 0
    while rest:
        if not (rest[0] == u'.' or rest[0] in digits):
            raise ValueError(to_native(invalid, 'backslashreplace'))
        i = 0
        while i < len(rest) and rest[i] in digits:
            i += 1
        whole = int(rest[:i]) if i else 0
        if whole > _GO_DURATION_MAX:
            raise ValueError(to_native(invalid, 'backslashreplace'))
        has_whole = i > 0
        rest = rest[i:]
        fraction, scale, has_fraction = 0, 1.0, False
        if rest[:1] == u'.':
            rest = rest[1:]
            i = 0
            overflow = False
            while i < len(rest) and rest[i] in digits:
                if not overflow:
                    if fraction > (_GO_DURATION_MAX - 1) // 10:
                        overflow = True
                    else:
                        bigger = fraction * 10 + int(rest[i])
                        if bigger > _GO_DURATION_MAX:
                            overflow = True
                        else:
                            fraction = bigger
                            scale *= 10
                i += 1
            has_fraction = i > 0
            rest = rest[i:]
        if not has_whole and not has_fraction:
            raise ValueError(to_native(invalid, 'backslashreplace'))
        i = 0
        while i < len(rest) and not (rest[i] == u'.' or rest[i] in digits):
            i += 1
        if i == 0:
            raise ValueError(to_native(u'missing unit in duration ' + quoted + hint,
                                       'backslashreplace'))
        unit_text, rest = rest[:i], rest[i:]
        unit = _GO_DURATION_UNITS.get(unit_text)
        if unit is None:
            raise ValueError(to_native(u'unknown unit "%s" in duration %s%s'
                                       % (_toml_printable(unit_text), quoted, hint),
                                       'backslashreplace'))
        if whole > _GO_DURATION_MAX // unit:
            raise ValueError(to_native(invalid, 'backslashreplace'))
        whole *= unit
        if fraction > 0:
            whole += int(float(fraction) * (float(unit) / scale))
            if whole > _GO_DURATION_MAX:
                raise ValueError(to_native(invalid, 'backslashreplace'))
        total += whole
        if total > _GO_DURATION_MAX:
            raise ValueError(to_native(invalid, 'backslashreplace'))
    if negative:
        return -total
    if total > _GO_DURATION_MAX - 1:
        raise ValueError(to_native(invalid, 'backslashreplace'))
    return total


def parse_go_duration(text):
    """Go time.ParseDuration syntax -> float seconds: "168h" -> 604800.0, "1h30m" -> 5400.0,
    "300ms" -> 0.3, "-1.5h", "0". Strings only; ValueError (clear message) otherwise."""
    return _go_duration_nanoseconds(text) / 1e9

# ------------------------------------------------------------------------- configuration ---

DEFAULT_CONFIG_PATH = '/etc/coriolis-ovm-exporter/config.toml'
# The secret printed in the Go service's README: everybody knows it.
PUBLISHED_EXAMPLE_SECRET = 'yoidthOcBauphFeykCotdidNorjAnAtGhonsabShegAtfexbavlyakPak4SletEd'
MANAGER_DEFAULT_PORT = 7002

# (dotted key, kind, default). Kinds: str, int, bool, duration, list.
CONFIG_SCHEMA = [
    ('db_file', 'str', '/etc/coriolis-ovm-exporter/exporter.db'),
    ('ovm_endpoint', 'str', ''),
    ('ovm_ca_certificate', 'str', ''),
    ('ovm_certificate_fingerprint', 'str', ''),
    ('ovm_fingerprint_file', 'str', ''),
    ('ovm_timeout', 'duration', 10.0),
    ('log_file', 'str', ''),
    ('log_level', 'str', 'info'),
    ('ovs_agent_db_dir', 'str', '/etc/ovs-agent/db'),
    ('snapshot_min_free_percent', 'int', 10),
    ('snapshot_pause', 'str', 'auto'),
    ('snapshot_pause_max', 'duration', 10.0),
    ('xen_toolstack', 'str', ''),
    ('jwt.secret', 'str', ''),
    ('jwt.time_to_live', 'duration', 168 * 3600.0),
    ('api.bind', 'str', '0.0.0.0'),
    ('api.port', 'int', 5544),
    ('api.max_connections', 'int', 64),
    ('api.handshake_timeout', 'duration', 10.0),
    ('api.idle_timeout', 'duration', 60.0),
    ('api.login_max_failures', 'int', 5),
    ('api.login_failure_window', 'duration', 300.0),
    ('api.tls.certificate', 'str', ''),
    ('api.tls.key', 'str', ''),
    ('api.tls.ca_certificate', 'str', ''),
    ('api.tls.require_client_certificate', 'bool', False),
    ('repository', 'list', None),
]
SECRET_KEYS = ('jwt.secret',)
LOG_LEVELS = ('debug', 'info', 'warning', 'error')
SNAPSHOT_PAUSE_MODES = ('auto', 'always', 'never')


class Config(object):
    """The effective configuration: every key of CONFIG_SCHEMA, flattened with '_' for '.'."""
    # The attributes, by name (set from `values` below):
    db_file = ovm_endpoint = ovm_ca_certificate = ovm_certificate_fingerprint = None
    ovm_fingerprint_file = ovm_timeout = log_file = log_level = ovs_agent_db_dir = None
    snapshot_min_free_percent = snapshot_pause = snapshot_pause_max = xen_toolstack = None
    jwt_secret = jwt_time_to_live = api_bind = api_port = api_max_connections = None
    api_handshake_timeout = api_idle_timeout = api_login_max_failures = None
    api_login_failure_window = api_tls_certificate = api_tls_key = None
    api_tls_ca_certificate = api_tls_require_client_certificate = repository = None

    def __init__(self, values, source='<defaults>'):
        self.source = source
        self.values = values
        for key, value in values.items():
            setattr(self, key.replace('.', '_'), value)
        self.demo = False  # the demo (and only the demo) may copy where it cannot clone

    @property
    def fingerprint_file(self):
        if self.ovm_fingerprint_file:
            return self.ovm_fingerprint_file
        return os.path.join(os.path.dirname(os.path.abspath(self.db_file)),
                            'ovm-manager.fingerprint')

    def describe(self):
        """Lines of `key = value` for check-config, secrets hidden."""
        lines = []
        for key, kind, default in CONFIG_SCHEMA:
            value = self.values[key]
            if key in SECRET_KEYS:
                value = '<hidden, %d bytes>' % len(to_bytes(value))
            if key == 'repository':  # keys in a fixed order (Python 2 dicts have none)
                text = '[%s]' % ', '.join(['{%s}' % ', '.join([
                    '"%s": %s' % (k, json.dumps(r.get(k)))
                    for k in ('id', 'mount_point', 'filesystem')]) for r in (value or [])])
            elif isinstance(value, float):
                text = float_text(value)
            else:
                text = json.dumps(value)
            lines.append('%s = %s' % (key, text))
        return lines


def float_text(value):
    """repr() of a float, shortest form also on Python 2.6 (its repr of 0.3 is
    0.29999999999999999)."""
    text = repr(value)
    short = '%.15g' % value
    if len(short) < len(text) and float(short) == value:
        text = short if re.search(r'[.e]|inf|nan', short) else short + '.0'
    return text


def _lookup_dotted(document, dotted):
    node = document
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _known_config_paths():
    known = set()
    for key, kind, default in CONFIG_SCHEMA:
        parts = key.split('.')
        for i in range(1, len(parts)):
            known.add('.'.join(parts[:i]))
        known.add(key)
    return known


def _unknown_config_keys(document, prefix=''):
    known = _known_config_paths()
    found = []
    for key, value in document.items():
        dotted = prefix + key
        if dotted == 'repository':
            continue
        if dotted not in known:
            found.append(dotted)
        elif isinstance(value, dict):
            found.extend(_unknown_config_keys(value, dotted + '.'))
    return found


def _coerce_config_value(source, key, kind, value):
    def bad_value(what):
        raise ConfigError('%s: key %s: %s' % (source, text_repr(key), what))
    if kind == 'str':
        if not isinstance(value, string_types):
            bad_value('expected a string, found %s' % text_repr(value))
        return text_type(value)
    if kind == 'int':
        if isinstance(value, bool) or not isinstance(value, integer_types):
            bad_value('expected an integer, found %s' % text_repr(value))
        return int(value)
    if kind == 'bool':
        if not isinstance(value, bool):
            bad_value('expected true or false, found %s' % text_repr(value))
        return value
    if kind == 'duration':
        if isinstance(value, bool):
            bad_value('expected a duration such as "10s" or "168h"')
        if isinstance(value, integer_types):
            return float(value)
        if not isinstance(value, string_types):
            bad_value('expected a duration such as "10s" or "168h"')
        try:
            return parse_go_duration(value)
        except ValueError as exc:
            bad_value(str(exc))
    if kind == 'list':
        if not isinstance(value, list) or [r for r in value if not isinstance(r, dict)]:
            bad_value('expected [[%s]] tables' % key)
        return value
    raise AssertionError(kind)


def config_from_document(document, source):
    values = {}
    for key, kind, default in CONFIG_SCHEMA:
        present, value = _lookup_dotted(document, key)
        values[key] = _coerce_config_value(source, key, kind, value) if present else default
    for key in _unknown_config_keys(document):
        log.warning('%s: unknown key %s ignored', source, text_repr(key))
    return Config(values, source)


class RepositoryConfigError(ConfigError):
    """An invalid [[repository]] table in the configuration."""


def check_repository_tables(configured, source='configuration'):
    """Every rule for the config's [[repository]] tables, in one place: validate_config runs
    it at load time (check-config, serve, vms), so a bad table is a clear ConfigError there.
    Raises RepositoryConfigError (a ConfigError)."""
    def bad_table(index, field, what):
        key = 'repository[%d]%s' % (index, field and '.' + field or '')
        raise RepositoryConfigError('%s: key %r: %s'
                                    % (source, key, to_native(what, 'backslashreplace')))

    seen = {}
    for index, table in enumerate(configured):
        if not isinstance(table, dict):
            bad_table(index, '', 'must be a [[repository]] table')
        repo_id = table.get('id')
        mount_point = table.get('mount_point')
        if not isinstance(repo_id, (bytes, text_type)) or not to_text(repo_id).strip():
            bad_table(index, 'id', 'is required and must be a non-empty string')
        if not isinstance(mount_point, (bytes, text_type)) or \
                not to_text(mount_point).strip().startswith('/'):
            bad_table(index, 'mount_point', 'is required and must be an absolute path')
        for field in ('filesystem', 'alias'):
            if table.get(field) is not None and not isinstance(table.get(field),
                                                               (bytes, text_type)):
                bad_table(index, field, 'must be a string')
        repo_id = to_text(repo_id).strip()
        if repo_id in seen:
            bad_table(index, 'id', u'repository id %s is listed twice (also repository[%d])'
                      % (repo_id, seen[repo_id]))
        seen[repo_id] = index


def validate_config(config):
    """Raise ConfigError naming the first problem; return a list of warnings."""
    source = config.source
    problems = []

    def bad_key(key, what):
        raise ConfigError('%s: key %r: %s' % (source, key, what))

    secret = to_bytes(config.jwt_secret)
    if not secret:
        bad_key('jwt.secret', 'is empty; set a long random secret')
    if config.jwt_secret == PUBLISHED_EXAMPLE_SECRET:
        bad_key('jwt.secret', 'is the example secret published in the Go service README; '
                'anybody could forge tokens. Generate a new one')
    if len(secret) < 32:
        problems.append('jwt.secret is shorter than 32 bytes; use a longer random secret')
    if not 0 <= config.api_port <= 65535:
        bad_key('api.port', 'must be between 1 and 65535 (0: any free port), found %d'
                % config.api_port)
    if config.jwt_time_to_live <= 0:
        bad_key('jwt.time_to_live', 'must be positive')
    for key in ('api.max_connections', 'api.login_max_failures'):
        if config.values[key] < 1:
            bad_key(key, 'must be at least 1')
    if not 0 <= config.snapshot_min_free_percent < 100:
        bad_key('snapshot_min_free_percent', 'must be between 0 and 99')
    if config.snapshot_pause not in SNAPSHOT_PAUSE_MODES:
        bad_key('snapshot_pause', 'must be one of %s' % ', '.join(SNAPSHOT_PAUSE_MODES))
    if not 0 < config.snapshot_pause_max <= 300:
        bad_key('snapshot_pause_max', 'must be more than 0s and at most 5m')
    if config.xen_toolstack and not os.path.isabs(config.xen_toolstack):
        bad_key('xen_toolstack', 'must be an absolute path such as /usr/sbin/xl')
    if config.log_level.lower() not in LOG_LEVELS:
        bad_key('log_level', 'must be one of %s' % ', '.join(LOG_LEVELS))
    if config.ovm_endpoint and not re.match(r'^https://[^/\s]+(/.*)?$', config.ovm_endpoint):
        bad_key('ovm_endpoint', 'must be an https:// URL such as https://manager:7002')
    if config.ovm_certificate_fingerprint:
        try:
            normalize_certificate_fingerprint(config.ovm_certificate_fingerprint)
        except ValueError as exc:
            bad_key('ovm_certificate_fingerprint', str(exc))
    check_repository_tables(config.repository or [], source)
    return problems


def load_config(path):
    """Read and parse a configuration file into a Config. Raises ConfigError."""
    config = config_from_document(load_toml_file(path), path)
    if os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning('%s is readable by other users and holds the JWT secret: chmod 600 it', path)
    return config


def default_config():
    return Config(dict((key, default) for key, kind, default in CONFIG_SCHEMA))


# ------------------------------------------------------ Berkeley DB hash reader / ovs-agent DBs ---
# Read-only, pure-Python reader for Berkeley DB HASH files (hash format versions 7-9, as written by
# DB 4.x/5.x), a restricted unpickler for the Python 2 pickles ovs-agent stores in them, and a
# sniffer for a repository's `.ovsmeta`.  Format: Berkeley DB 5.3's db_page.h and hash.h.


BDB_HASH_MAGIC = 0x061561
BDB_BTREE_MAGIC = 0x053162
_BDB_HASH_VERSIONS = (7, 8, 9)
_BDB_P_HASH_UNSORTED = 2
_BDB_P_OVERFLOW = 7
_BDB_P_HASHMETA = 8
_BDB_P_HASH = 13
_BDB_H_KEYDATA = 1
_BDB_H_DUPLICATE = 2
_BDB_H_OFFPAGE = 3
_BDB_H_OFFDUP = 4
_BDB_HOFFPAGE_SIZE = 12
_BDB_DB_HASH_DUP = 0x01
_BDB_DB_HASH_SUBDB = 0x02
_BDB_DB_HASH_DUPSORT = 0x04
_BDB_DBMETA_CHKSUM = 0x01
_BDB_SIZEOF_PAGE = 26
_BDB_SIZEOF_PAGE_CHKSUM = 32



class BerkeleyDBError(Exception):
    """A Berkeley DB file that cannot be read: corrupt, truncated, or of an unsupported kind."""


class BerkeleyDBUnsupportedError(BerkeleyDBError):
    """A well-formed Berkeley DB file of a kind this reader refuses (encrypted, sub-databases,
    duplicates).  Not retried: re-reading cannot change the answer."""


class UnsafePickleError(Exception):
    """A pickle that is refused (asks for a global / object) or cannot be unpickled."""


def _bdb_log2(n):
    """Smallest i with 2**i >= n (Berkeley DB's __db_log2)."""
    i = 0
    limit = 1
    while limit < n:
        limit <<= 1
        i += 1
    return i


def _bdb_parse_meta(data, name):
    if len(data) < 512:
        raise BerkeleyDBError('%s: not a Berkeley DB hash file (only %d bytes)' % (name, len(data)))
    endian = None
    for prefix in ('<', '>'):
        magic = struct.unpack_from(prefix + 'I', data, 12)[0]
        if magic == BDB_HASH_MAGIC:
            endian = prefix
            break
        if magic == BDB_BTREE_MAGIC:
            raise BerkeleyDBUnsupportedError(
                '%s: is a Berkeley DB btree file or a file of named sub-databases, '
                'not a single hash database' % name)
    if endian is None:
        raise BerkeleyDBError('%s: not a Berkeley DB hash file (bad magic)' % name)
    version, pagesize = struct.unpack_from(endian + 'II', data, 16)
    encrypt_alg, ptype, metaflags = struct.unpack_from('BBB', data, 24)
    free_pgno, last_pgno = struct.unpack_from(endian + 'II', data, 28)
    flags = struct.unpack_from(endian + 'I', data, 48)[0]
    if version not in _BDB_HASH_VERSIONS:
        raise BerkeleyDBUnsupportedError(
            '%s: unsupported Berkeley DB hash version %d' % (name, version))
    if pagesize < 512 or pagesize > 65536 or (pagesize & (pagesize - 1)) != 0:
        raise BerkeleyDBError('%s: invalid page size %d' % (name, pagesize))
    if ptype != _BDB_P_HASHMETA:
        raise BerkeleyDBError('%s: page 0 is not a hash meta page (type %d)' % (name, ptype))
    if encrypt_alg != 0:
        raise BerkeleyDBUnsupportedError('%s: encrypted Berkeley DB files are not supported' % name)
    if flags & _BDB_DB_HASH_SUBDB:
        raise BerkeleyDBUnsupportedError(
            '%s: Berkeley DB files with sub-databases are not supported' % name)
    if flags & (_BDB_DB_HASH_DUP | _BDB_DB_HASH_DUPSORT):
        raise BerkeleyDBUnsupportedError(
            '%s: Berkeley DB files with duplicate keys are not supported' % name)
    max_bucket, high_mask, low_mask = struct.unpack_from(endian + 'III', data, 72)
    spares = struct.unpack_from(endian + '32I', data, 96)
    if metaflags & _BDB_DBMETA_CHKSUM:
        hdrlen = _BDB_SIZEOF_PAGE_CHKSUM
    else:
        hdrlen = _BDB_SIZEOF_PAGE
    return {
        'endian': endian, 'version': version, 'pagesize': pagesize, 'hdrlen': hdrlen,
        'max_bucket': max_bucket, 'spares': spares, 'free': free_pgno,
        'last_pgno': last_pgno,
    }


def _bdb_read_overflow(data, name, meta, npages, start, tlen, used):
    """Collect an off-page item: chain of P_OVERFLOW pages from `start`, total length `tlen`."""
    pagesize = meta['pagesize']
    hdrlen = meta['hdrlen']
    endian = meta['endian']
    if tlen > npages * pagesize:
        raise BerkeleyDBError('%s: overflow item length %d exceeds the file size' % (name, tlen))
    parts = []
    got = 0
    pgno = start
    while True:
        if pgno <= 0 or pgno >= npages:
            raise BerkeleyDBError('%s: overflow page %d out of range' % (name, pgno))
        if pgno in used:
            raise BerkeleyDBError('%s: page %d referenced twice (loop or corruption)' % (name, pgno))
        used.add(pgno)
        base = pgno * pagesize
        hdr_pgno, _prev, nxt, _ref, ov_len, _level, ptype = struct.unpack_from(
            endian + 'IIIHHBB', data, base + 8)
        if ptype != _BDB_P_OVERFLOW or hdr_pgno != pgno:
            raise BerkeleyDBError('%s: page %d is not an overflow page (type %d)' % (name, pgno, ptype))
        if ov_len > pagesize - hdrlen or got + ov_len > tlen:
            raise BerkeleyDBError('%s: overflow page %d has a bad length %d' % (name, pgno, ov_len))
        parts.append(data[base + hdrlen:base + hdrlen + ov_len])
        got += ov_len
        if nxt == 0:
            break
        pgno = nxt
    if got != tlen:
        raise BerkeleyDBError('%s: overflow item is %d bytes, expected %d' % (name, got, tlen))
    return b''.join(parts)


def _bdb_item(data, name, meta, npages, pgno, base, off, length, used, is_key):
    itype = struct.unpack_from('B', data, base + off)[0]
    if itype == _BDB_H_KEYDATA:
        return data[base + off + 1:base + off + length]
    if itype == _BDB_H_OFFPAGE:
        if length != _BDB_HOFFPAGE_SIZE:
            raise BerkeleyDBError('%s: page %d: bad off-page item size %d' % (name, pgno, length))
        ov_pgno, tlen = struct.unpack_from(meta['endian'] + 'II', data, base + off + 4)
        return _bdb_read_overflow(data, name, meta, npages, ov_pgno, tlen, used)
    if not is_key and itype in (_BDB_H_DUPLICATE, _BDB_H_OFFDUP):
        raise BerkeleyDBUnsupportedError(
            '%s: duplicate data items are not supported (page %d)' % (name, pgno))
    raise BerkeleyDBError('%s: page %d: unknown item type %d' % (name, pgno, itype))


def _bdb_read_hash_page(data, name, meta, npages, pgno, used, out):
    """Append the pairs of hash page `pgno` to `out`; return next_pgno (0 = end of chain)."""
    pagesize = meta['pagesize']
    hdrlen = meta['hdrlen']
    endian = meta['endian']
    base = pgno * pagesize
    hdr_pgno, _prev, nxt, entries, _hf, _level, ptype = struct.unpack_from(
        endian + 'IIIHHBB', data, base + 8)
    if ptype not in (_BDB_P_HASH, _BDB_P_HASH_UNSORTED) or hdr_pgno != pgno:
        raise BerkeleyDBError('%s: page %d is not a hash page (type %d, pgno %d)'
                              % (name, pgno, ptype, hdr_pgno))
    if entries % 2 != 0 or hdrlen + 2 * entries > pagesize:
        raise BerkeleyDBError('%s: page %d: bad entry count %d' % (name, pgno, entries))
    if entries:
        inp = struct.unpack_from(endian + '%dH' % entries, data, base + hdrlen)
    else:
        inp = ()
    low = hdrlen + 2 * entries
    prev_off = pagesize
    key = None
    for j in range(entries):
        off = inp[j]
        if off < low or off >= prev_off:
            raise BerkeleyDBError('%s: page %d: item %d offset %d out of place' % (name, pgno, j, off))
        length = prev_off - off
        prev_off = off
        item = _bdb_item(data, name, meta, npages, pgno, base, off, length, used, j % 2 == 0)
        if j % 2 == 0:
            key = item
        else:
            out.append((key, item))
    return nxt


def parse_bdb_hash(data, name='<bytes>'):
    """Parse a whole Berkeley DB HASH file held in `data` (bytes).

    Returns a list of (key_bytes, value_bytes) in bucket order.  Raises BerkeleyDBError (or its
    subclass BerkeleyDBUnsupportedError) naming `name` for anything unreadable or unsupported."""
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        meta = _bdb_parse_meta(data, name)
        pagesize = meta['pagesize']
        npages = len(data) // pagesize
        if len(data) % pagesize != 0:
            raise BerkeleyDBError('%s: file size %d is not a multiple of the page size %d'
                                  % (name, len(data), pagesize))
        max_bucket = meta['max_bucket']
        if max_bucket >= npages:
            raise BerkeleyDBError('%s: %d buckets but only %d pages' % (name, max_bucket + 1, npages))
        spares = meta['spares']
        zero_page = b'\x00' * pagesize
        used = set()
        out = []
        for bucket in range(max_bucket + 1):
            pgno = (bucket + spares[_bdb_log2(bucket + 1)]) & 0xffffffff
            first = True
            while True:
                if pgno <= 0 or pgno >= npages:
                    raise BerkeleyDBError('%s: bucket %d: page %d out of range' % (name, bucket, pgno))
                if pgno in used:
                    raise BerkeleyDBError('%s: page %d referenced twice (loop or corruption)'
                                          % (name, pgno))
                used.add(pgno)
                if first and data[pgno * pagesize:(pgno + 1) * pagesize] == zero_page:
                    break  # an empty bucket whose page was never written
                first = False
                pgno = _bdb_read_hash_page(data, name, meta, npages, pgno, used, out)
                if pgno == 0:
                    break
        return out
    except (struct.error, IndexError, ValueError, OverflowError) as e:
        raise BerkeleyDBError('%s: corrupt Berkeley DB file (%s)' % (name, e))


def _bdb_read_file(path):
    f = open(path, 'rb')
    try:
        return f.read()
    finally:
        f.close()


def read_bdb_hash(path):
    """Read the Berkeley DB HASH file `path` -> list of (key_bytes, value_bytes).

    The file is read whole into memory and parsed from there (ovs-agent may rewrite it at any
    time); on a structural error it is read and parsed once more before BerkeleyDBError is raised.
    I/O errors (missing file, permissions) propagate as IOError/OSError."""
    data = _bdb_read_file(path)
    try:
        return parse_bdb_hash(data, path)
    except BerkeleyDBUnsupportedError:
        raise
    except BerkeleyDBError as e:
        log.debug('%s; reading it again', e)
    return parse_bdb_hash(_bdb_read_file(path), path)


# --------------------------------------------------------------------------- pickles ---

_TO_TEXT_MAX_DEPTH = 100
_TO_TEXT_MAX_NODES = 1000000


def _to_text_walk(value, depth, budget):
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError('structure too large')
    if depth > _TO_TEXT_MAX_DEPTH:
        raise ValueError('structure nested too deeply (or recursive)')
    if isinstance(value, (bytes, bytearray)):
        return to_text(value, 'latin-1')
    if isinstance(value, dict):
        res = {}
        for k, v in value.items():
            res[_to_text_walk(k, depth + 1, budget)] = _to_text_walk(v, depth + 1, budget)
        return res
    if isinstance(value, list):
        return [_to_text_walk(v, depth + 1, budget) for v in value]
    if isinstance(value, tuple):
        return tuple([_to_text_walk(v, depth + 1, budget) for v in value])
    return value


def to_text_tree(value):
    """Recursively turn bytes (Python 2 `str`) into text (UTF-8, else latin-1) inside dicts,
    lists and tuples; other values are returned unchanged.  Text is `unicode` on Python 2 and
    `str` on Python 3.  Raises ValueError for recursive, too deep or too large structures."""
    return _to_text_walk(value, 0, [_TO_TEXT_MAX_NODES])


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that allows only plain data: any global (class, function) is refused."""

    def find_class(self, module, name):
        raise UnsafePickleError('pickle refers to a global %s.%s: refused' % (module, name))

    def persistent_load(self, pid):
        raise UnsafePickleError('pickle uses a persistent id: refused')


def safe_unpickle(data):
    """Unpickle `data` (bytes; pickle protocols 0-2, e.g. written by Python 2) allowing only
    plain data (dict, list, tuple, str, unicode, int, long, float, bool, None).

    Python 2 `str` values become text (UTF-8, else latin-1, per string) on every Python, so the
    result equals to_text_tree(result).  Raises UnsafePickleError for a pickle asking for any global
    and for every other failure (truncated, garbage, recursive)."""
    if not isinstance(data, bytes):
        raise UnsafePickleError('pickle data must be bytes, not %s' % type(data).__name__)
    if data[:1] == b'\x80' and len(data) >= 2 and struct.unpack_from('B', data, 1)[0] > 2:
        raise UnsafePickleError('pickle protocol %d refused (only 0-2)'
                                % struct.unpack_from('B', data, 1)[0])
    try:
        if not PY2:
            unpickler = _SafeUnpickler(io.BytesIO(data), encoding='bytes')
        else:
            unpickler = _SafeUnpickler(io.BytesIO(data))
        value = unpickler.load()
        return to_text_tree(value)
    except UnsafePickleError:
        raise
    except Exception as e:
        raise UnsafePickleError('cannot unpickle: %s: %s' % (type(e).__name__, e))


def read_ovs_agent_db(path):
    """Read an ovs-agent database (Berkeley DB hash of pickles) -> dict text key -> value.

    Values are safe_unpickle()d (text, not bytes).  A record whose value cannot be unpickled is
    logged as a warning and skipped; an unreadable file raises BerkeleyDBError; I/O errors
    propagate as IOError/OSError."""
    result = {}
    for key, value in read_bdb_hash(path):
        tkey = to_text(key, 'latin-1')
        try:
            result[tkey] = safe_unpickle(value)
        except UnsafePickleError as e:
            log.warning('%s: record %s skipped: %s', path, text_repr(tkey), e)
    return result


def _ovsmeta_entries(mapping, path):
    res = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            res[k] = v
        else:
            log.debug('%s: entry %s is not an object, ignored', path, text_repr(k))
    return res


def _ovsmeta_decode_value(value):
    try:
        return to_text_tree(json.loads(value.decode('utf-8')))
    except (ValueError, UnicodeDecodeError):
        pass
    return safe_unpickle(value)


def sniff_ovsmeta(path):
    """Read a repository's `.ovsmeta`, whatever it is: a JSON object, or a Berkeley DB hash whose
    values are JSON or pickles.  Returns {file basename (text): {"OBJECT_TYPE": ..., ...}};
    anything unreadable gives {} (logged at debug level)."""
    try:
        data = _bdb_read_file(path)
        stripped = data.lstrip()
        if stripped.startswith(b'\xef\xbb\xbf'):
            stripped = stripped[3:].lstrip()
        if stripped[:1] == b'{':
            obj = to_text_tree(json.loads(stripped.decode('utf-8')))
            if not isinstance(obj, dict):
                return {}
            return _ovsmeta_entries(obj, path)
        if len(data) >= 16 and BDB_HASH_MAGIC in (struct.unpack_from('<I', data, 12)[0],
                                                  struct.unpack_from('>I', data, 12)[0]):
            try:
                pairs = parse_bdb_hash(data, path)
            except BerkeleyDBUnsupportedError:
                raise
            except BerkeleyDBError as e:
                log.debug('%s; reading it again', e)
                pairs = read_bdb_hash(path)
            res = {}
            for key, value in pairs:
                tkey = to_text(key, 'latin-1')
                try:
                    res[tkey] = _ovsmeta_decode_value(value)
                except UnsafePickleError as e:
                    log.debug('%s: entry %s ignored: %s', path, text_repr(tkey), e)
            return _ovsmeta_entries(res, path)
        log.debug('%s: neither JSON nor Berkeley DB, ignored', path)
    except Exception as e:
        log.debug('%s: cannot read repository metadata: %s', path, e)
    return {}

# ------------------------------------------------------- VM and repository discovery ---
# Finds repositories (ovs-agent `repository` database or the config's [[repository]] tables),
# the VMs in `<mount_point>/VirtualMachines/*/vm.cfg`, and their disks, and decides which
# disks / VMs can be snapshotted (README "The API").
# vm.cfg files are read with ast.parse + ast.literal_eval only: never eval/exec.


VM_CFG_MAX_BYTES = 1024 * 1024
# More "depth-making" characters than this outside string literals and comments means the file
# is not an OVM-written vm.cfg; ast.parse is then not trusted with the whole file (Python 2.7's
# compiler crashes with a segfault on a ~100,000-deep `1+1+...` or `a.b.c...` chain).
VM_CFG_MAX_OPERATORS = 5000
VM_CFG_MAX_NESTING = 64  # bracket lines a multi-line value may nest (OVM writes 1)
VM_CFG_MAX_WARNINGS = 20  # per file read line by line; then one line with the count
VM_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')
DISK_MODES = ('r', 'ro', 'w', 'w!', 'rw')
OVSMETA_OBJECT_TYPES_CLONABLE = ('', 'VIRTUAL_DISK')
OVSMETA_OBJECT_TYPES_MEDIA = ('ISO',)

_DISCOVERY_TOKEN_START_RE = re.compile(r'[\'"#]')
_DISCOVERY_COMMENT_RE = re.compile(r'#[^\r\n]*')
_DISCOVERY_STRING_BODY_RES = {
    "'": re.compile(r"[^'\\\r\n]*(?:\\(?:\r\n|[\s\S])[^'\\\r\n]*)*"),
    '"': re.compile(r'[^"\\\r\n]*(?:\\(?:\r\n|[\s\S])[^"\\\r\n]*)*'),
    "'''": re.compile(r"[^'\\]*(?:(?:\\[\s\S]|'(?!''))[^'\\]*)*"),
    '"""': re.compile(r'[^"\\]*(?:(?:\\[\s\S]|"(?!""))[^"\\]*)*'),
}
_DISCOVERY_OPERATOR_RE = re.compile(
    r'[-+*/%&|^~<>.@(\[{]|\b(?:not|if|lambda|and|or|await|yield)\b')
_DISCOVERY_BRACKET_RE = re.compile(r'[\[\](){}]')
_DISCOVERY_CODING_RE = re.compile(r'^[ \t\f]*#.*?coding[:=]')
_DISCOVERY_LINE_ASSIGN_RE = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(?!=)(.*)$')
_DISCOVERY_TAP_FILE_PREFIXES = ('tap:aio:', 'tap:tapdisk:aio:', 'tap2:tapdisk:aio:', 'tap2:aio:')


class VmConfigError(Exception):
    """A vm.cfg that cannot be read at all (too large, unreadable)."""


def _discovery_is_ascii(text):
    try:
        text.encode('ascii')
    except UnicodeError:
        return False
    return True


def _vm_cfg_normalise(value):
    """Turn literal_eval output into text strings and lists, recursively."""
    if isinstance(value, bytes):
        return value.decode('utf-8', 'replace')
    if isinstance(value, (list, tuple)):
        return [_vm_cfg_normalise(item) for item in value]
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            result[_vm_cfg_normalise(key)] = _vm_cfg_normalise(item)
        return result
    return value


def _vm_cfg_code_spans(text):
    """(start, end) spans of `text` outside string literals and comments, split the way
    Python's tokenizer splits them (triple quotes, backslash escapes), in one linear pass.
    Where this cannot be sure it errs towards code: an unterminated string or an f-string
    (whose {expressions} are parsed) makes the rest of the text code."""
    spans = []
    pos = 0
    end = len(text)
    while pos < end:
        match = _DISCOVERY_TOKEN_START_RE.search(text, pos)
        if match is None:
            break
        start = match.start()
        spans.append((pos, start))
        char = text[start]
        if char == '#':
            pos = _DISCOVERY_COMMENT_RE.match(text, start).end()
            continue
        quote = char * 3 if text.startswith(char * 3, start) else char
        body_end = _DISCOVERY_STRING_BODY_RES[quote].match(text, start + len(quote)).end()
        if not text.startswith(quote, body_end) or 'f' in text[max(0, start - 2):start].lower():
            pos = start  # unterminated, or an f-string (3.12 nests quotes in them): all code
            break
        pos = body_end + len(quote)
    spans.append((pos, end))
    return spans


def _vm_cfg_operator_count(text):
    """Count of characters/words that deepen an expression tree, outside strings and
    comments. OVM-written files have a few dozen; a hostile file can have 100,000+."""
    findall = _DISCOVERY_OPERATOR_RE.findall
    return sum([len(findall(text, start, end)) for start, end in _vm_cfg_code_spans(text)])


def _vm_cfg_bracket_balance(text):
    """Opening minus closing brackets outside strings and comments."""
    balance = 0
    for start, end in _vm_cfg_code_spans(text):
        for bracket in _DISCOVERY_BRACKET_RE.findall(text, start, end):
            balance += 1 if bracket in '([{' else -1
    return balance


def _vm_cfg_closing_lines(lines):
    """closing[i]: the first line j >= i at whose end every bracket opened from the start of
    line i on is closed again, or None (also when they nest deeper than VM_CFG_MAX_NESTING
    lines on the way). One pass (next smaller-or-equal running depth). The spans found nest
    like brackets, at most VM_CFG_MAX_NESTING deep: trying them all costs linear time."""
    depths = [0]  # depths[k + 1]: bracket depth at the end of line k
    for line in lines:
        depths.append(depths[-1] + _vm_cfg_bracket_balance(line))
    closing = [None] * len(lines)
    waiting = []  # line indexes still open, rising depths; those below `live` nest too deep
    live = 0
    for k, depth in enumerate(depths):
        while len(waiting) > live and depth <= depths[waiting[-1]]:
            closing[waiting.pop()] = k - 1
        while len(waiting) > live and depth - depths[waiting[live]] > VM_CFG_MAX_NESTING:
            live += 1
        if k < len(lines):
            waiting.append(k)
    return closing


def _vm_cfg_literal(node_or_text):
    """literal_eval that reports every failure (including RecursionError/MemoryError from a
    pathological value) as ValueError."""
    try:
        return _vm_cfg_normalise(ast.literal_eval(node_or_text))
    except ValueError:
        raise ValueError('')
    except Exception as e:  # SyntaxError, RecursionError, MemoryError, ...
        raise ValueError(u'{0}: {1}'.format(type(e).__name__, to_text(e)))


def _vm_cfg_node_kind(node):
    return type(node).__name__


def _vm_cfg_parse_ast(text, source):
    tree = ast.parse(text, '<vm.cfg>')  # source may be non-ASCII: Python 2 wants a str
    result = {}
    for stmt in tree.body:
        lineno = getattr(stmt, 'lineno', 0)
        if not isinstance(stmt, ast.Assign):
            log.warning('%s line %s: ignoring a statement of type %s (only "key = literal" is read)',
                        source, lineno, _vm_cfg_node_kind(stmt))
            continue
        keys = []
        for target in stmt.targets:
            if isinstance(target, ast.Name):
                keys.append(target.id)
        if not keys:
            log.warning('%s line %s: ignoring an assignment to something other than a name',
                        source, lineno)
            continue
        try:
            value = _vm_cfg_literal(stmt.value)
        except ValueError as e:
            detail = to_text(e)
            log.warning('%s line %s: skipping %s: its value is a %s, not a literal%s', source, lineno,
                        ', '.join(keys), _vm_cfg_node_kind(stmt.value), detail and ' (' + detail + ')' or '')
            continue
        for key in keys:
            result[to_text(key)] = value
    return result


def _vm_cfg_parse_lines(text, source):
    """Fallback for a file that ast.parse rejects: `key = value` per line (a value opening a
    bracket may continue on the following lines), each value literal_eval'ed on its own."""
    result = {}
    lines = text.splitlines()
    count = len(lines)
    closing = None
    skipped = 0
    index = 0
    while index < count:
        line = lines[index].strip()
        index += 1
        if not line or line.startswith('#'):
            continue
        match = _DISCOVERY_LINE_ASSIGN_RE.match(line)
        if match is None:
            continue
        key = to_text(match.group(1))
        value_text = match.group(2).strip()
        if _vm_cfg_operator_count(value_text) > VM_CFG_MAX_OPERATORS:
            skipped += 1
            if skipped <= VM_CFG_MAX_WARNINGS:
                log.warning('%s line %s: skipping %s: value too complex', source, index, key)
            continue
        value = None
        found = False
        error = None
        try:
            value = _vm_cfg_literal(value_text)
            found = True
        except ValueError as e:
            error = e
        if not found and value_text[:1] in ('[', '(', '{'):
            # A list spread over several lines: up to the line that closes its brackets.
            if closing is None:
                closing = _vm_cfg_closing_lines(lines)
            last = closing[index - 1]
            if last is not None and index <= last < index + 1000:
                joined = u'\n'.join([value_text] + lines[index:last + 1])
                if _vm_cfg_operator_count(joined) <= VM_CFG_MAX_OPERATORS:
                    try:
                        value = _vm_cfg_literal(joined)
                        found = True
                        index = last + 1
                    except ValueError:
                        pass
        if found:
            result[key] = value
            continue
        skipped += 1
        if skipped <= VM_CFG_MAX_WARNINGS:
            log.warning('%s line %s: skipping %s: not a literal%s', source, index, key,
                        error and to_text(error) and u' (' + to_text(error) + u')' or u'')
    if skipped > VM_CFG_MAX_WARNINGS:
        log.warning('%s: skipped %d more values that are not literals', source,
                    skipped - VM_CFG_MAX_WARNINGS)
    return result


def parse_vm_cfg(text, source):
    """Parse an xm-style vm.cfg (Python assignments of literals) into {key: value} with text
    strings. Never executes anything: values that are not literals (calls, names,
    __import__, ...) are skipped with a warning. If the file as a whole is not valid Python,
    falls back to per-line `key = value` parsing. Raises VmConfigError for input over
    VM_CFG_MAX_BYTES."""
    if isinstance(text, bytes):
        if len(text) > VM_CFG_MAX_BYTES:
            raise VmConfigError(u'{0}: {1} bytes, larger than the {2} bytes a vm.cfg may have'.format(
                source, len(text), VM_CFG_MAX_BYTES))
        text = text.decode('utf-8', 'replace')
    if not isinstance(text, text_type):
        raise VmConfigError(u'{0}: not text'.format(source))
    if len(text) > VM_CFG_MAX_BYTES:
        raise VmConfigError(u'{0}: {1} characters, larger than the {2} bytes a vm.cfg may have'.format(
            source, len(text), VM_CFG_MAX_BYTES))
    source = to_text(source)
    # A coding cookie in a text (unicode) source is a SyntaxError on Python 2: blank it.
    lines = text.split('\n', 2)
    for i in range(min(2, len(lines))):
        if _DISCOVERY_CODING_RE.match(lines[i]):
            lines[i] = u'#'
    text = u'\n'.join(lines)
    if _vm_cfg_operator_count(text) > VM_CFG_MAX_OPERATORS:
        log.warning('%s: too many operators for an OVM vm.cfg; reading it line by line', source)
        return _vm_cfg_parse_lines(text, source)
    try:
        return _vm_cfg_parse_ast(text, source)
    except Exception as e:  # SyntaxError, MemoryError ("s_push: parser stack overflow"), ...
        detail = to_text(e)
        if isinstance(e, SyntaxError):
            detail = u'line {0}: {1}'.format(e.lineno, to_text(e.msg))
        log.warning('%s is not valid Python (%s); reading it line by line', source, detail)
        return _vm_cfg_parse_lines(text, source)


def read_vm_cfg_file(path):
    """Read and parse one vm.cfg. Returns (parsed dict, os.fstat result).
    Raises VmConfigError (too large, not a regular file) or EnvironmentError (unreadable)."""
    try:
        fd = open_regular_file(path)
    except NotRegularFileError as e:
        raise VmConfigError(to_text(e.strerror))
    handle = os.fdopen(fd, 'rb')
    try:
        st = os.fstat(handle.fileno())
        if st.st_size > VM_CFG_MAX_BYTES:
            raise VmConfigError(u'{0}: {1} bytes, larger than the {2} bytes a vm.cfg may have'.format(
                path, st.st_size, VM_CFG_MAX_BYTES))
        data = handle.read(VM_CFG_MAX_BYTES + 1)
    finally:
        handle.close()
    return parse_vm_cfg(data, path), st


def parse_disk_entry(entry):
    """Parse one vm.cfg `disk` entry `<type>:<path>,<vdev>,<mode>`.
    Returns {"kind": "file"|"phy", "path", "device_name", "mode", "cdrom": bool}, or None (with
    a warning) for a shape we do not understand. `file:///p` and `tap:aio:p` are files; file paths
    are normalised (one leading slash, no `..`). An empty CD-ROM drive gives path ""."""
    if not isinstance(entry, (bytes, text_type)):
        log.warning('disk entry %s is not a string; ignored', text_repr(entry))
        return None
    entry = to_text(entry)
    text = entry.strip()
    parts = text.rsplit(',', 2)
    if len(parts) != 3:
        log.warning('disk entry %s is not "<type>:<path>,<device>,<mode>"; ignored',
                    text_repr(entry))
        return None
    target, device, mode = parts[0].strip(), parts[1].strip(), parts[2].strip()
    if mode not in DISK_MODES:
        log.warning('disk entry %s: unknown mode %s; ignored', text_repr(entry), text_repr(mode))
        return None
    if not device or len(device.split()) != 1:
        log.warning('disk entry %s: bad device name %s; ignored', text_repr(entry),
                    text_repr(device))
        return None
    cdrom = device.endswith(':cdrom')
    kind = None
    path = None
    if target.startswith('file:'):
        kind, path = 'file', target[len('file:'):]
    elif target.startswith('phy:'):
        kind, path = 'phy', target[len('phy:'):]
    else:
        for prefix in _DISCOVERY_TAP_FILE_PREFIXES:
            if target.startswith(prefix):
                kind, path = 'file', target[len(prefix):]
                break
    if kind is None:
        if target == '' and cdrom:
            kind, path = 'file', ''
        else:
            log.warning('disk entry %s: unsupported disk type; ignored', text_repr(entry))
            return None
    path = path.strip()
    if kind == 'file':
        if path:
            if not path.startswith('/'):
                log.warning('disk entry %s: file path is not absolute; ignored',
                            text_repr(entry))
                return None
            # file:/p, file:///p -> /p; remove "." and ".." so that prefix tests are honest
            path = posixpath.normpath('/' + path.lstrip('/'))
        elif not cdrom:
            log.warning('disk entry %s: empty path; ignored', text_repr(entry))
            return None
    else:
        if not path:
            log.warning('disk entry %s: empty device path; ignored', text_repr(entry))
            return None
        if not path.startswith('/'):
            path = '/dev/' + path  # xm: phy:sdb1 means /dev/sdb1
    return {'kind': kind, 'path': path, 'device_name': device, 'mode': mode, 'cdrom': cdrom}


def _repository_mount_point(value):
    mount_point = to_text(value).strip()
    if len(mount_point) > 1:
        mount_point = mount_point.rstrip('/') or '/'
    return mount_point


def make_repository_record(repo_id, values):
    """A repository record with text fields id, mount_point, filesystem, alias, manager_uuid,
    version, fs_location (missing -> "")."""
    record = {'id': to_text(repo_id).strip()}
    for field in ('filesystem', 'alias', 'manager_uuid', 'version', 'fs_location'):
        record[field] = to_text(values.get(field))
    record['mount_point'] = _repository_mount_point(values.get('mount_point'))
    return record


def _discovery_lookup(mapping, key):
    """mapping[key] with key tried as text and as bytes (pickles from Python 2 may have either)."""
    if key in mapping:
        return mapping[key]
    other = key.encode('utf-8') if isinstance(key, text_type) else key.decode('utf-8')
    return mapping.get(other)


def configured_repositories(configured):
    """Repository records for the config's [[repository]] tables (check_repository_tables)."""
    check_repository_tables(configured)
    return [make_repository_record(table.get('id'), table) for table in configured]


def load_repositories(db_reader, db_dir, configured):
    """Repository records: the configured [[repository]] tables when `configured` is non-empty
    (RepositoryConfigError if one is invalid), else the ovs-agent `<db_dir>/repository` database
    read with db_reader(path) -> {repo id: {field: value}} (its errors propagate). Records
    without a mount point are skipped with a warning. Database records are sorted by id."""
    if configured:
        return configured_repositories(configured)
    path = os.path.join(db_dir, 'repository')
    raw = db_reader(path)
    records = []
    for key in sorted(raw.keys(), key=to_text):
        values = raw[key]
        if not isinstance(values, dict):
            log.warning('%s: record %s is not a dict; ignored', path, text_repr(key))
            continue
        text_values = {}
        for field, value in values.items():
            text_values[to_text(field)] = value
        record = make_repository_record(key, text_values)
        if not record['mount_point'].startswith('/'):
            log.warning('%s: repository %s has no usable mount_point; ignored', path, record['id'])
            continue
        records.append(record)
    return records


def manager_ip_from_server_db(db_reader, db_dir):
    """`manager_ip` from the ovs-agent `<db_dir>/server` database, as text, or None when the
    database cannot be read or holds no manager_ip (the reason is logged)."""
    path = os.path.join(db_dir, 'server')
    try:
        raw = db_reader(path)
    except Exception as e:
        log.warning('cannot read the ovs-agent server database %s: %s', path, to_text(e))
        return None
    value = _discovery_lookup(raw, u'manager_ip')
    if value is None or not isinstance(value, (bytes, text_type)):
        log.warning('%s holds no manager_ip', path)
        return None
    value = to_text(value).strip()
    return value or None


def _discovery_stat_key(st):
    return (st.st_mtime, st.st_size, st.st_ino, st.st_dev)


# A cache entry: what it is valid for (a file's stat key, or when it was made), the value, and
# the problem to warn about again.
Cached = collections.namedtuple('Cached', 'key value problem')


class ParsedFiles(object):
    """Files parsed by parse(path, os.stat result) -> Cached(stat key, value, problem) (None:
    the file is gone), each parsed again only when its stat key changes. A pass (begin() ...
    end()) forgets the files it did not get() or keep()."""

    def __init__(self, parse):
        self.parse = parse
        self.reads = 0
        self._entries = {}
        self._seen = {}

    def get(self, path, st):
        entry = self._entries.get(path)
        if entry is None or entry.key != _discovery_stat_key(st):
            self.reads += 1
            entry = self.parse(path, st)
            if entry is None:
                return None
            self._entries[path] = entry
        self._seen[path] = entry
        return entry

    def keep(self, folder):
        """Keep what was parsed under `folder` (a repository that cannot be listed now)."""
        for path, entry in self._entries.items():
            if path.startswith(folder + '/'):
                self._seen[path] = entry

    def begin(self):
        self._seen = {}

    def end(self):
        self._entries, self._seen = self._seen, {}


class RepositoryDbLoader(object):
    """A repositories_loader for HostInventory: load_repositories(...) that re-reads the
    `repository` database only when its (mtime, size, inode) changed."""

    def __init__(self, db_reader, db_dir, configured=None):
        self.configured = configured and configured_repositories(configured)
        self.path = os.path.join(db_dir, 'repository')
        self._file = ParsedFiles(lambda path, st: Cached(
            _discovery_stat_key(st), load_repositories(db_reader, db_dir, None), ''))
        self._lock = threading.Lock()

    def __call__(self):
        if self.configured:
            return [dict(r) for r in self.configured]
        with self._lock:
            records = self._file.get(self.path, os.stat(self.path)).value
        return [dict(r) for r in records]


# ------------------------------------------------------------------ mounts and disk files ---
# OCFS2 repositories mount after the cluster is up and are unmounted for maintenance: the bare
# mount point is then a folder of the dom0's root filesystem. Nothing may be created there, and
# nothing recorded may be forgotten because its files cannot be seen there.

MOUNT_TABLE_PATHS = ('/proc/self/mounts', '/proc/mounts')
# the filesystem a repository names -> the types the kernel's mount table may show for it
_FILESYSTEM_TYPE_ALIASES = {'nfs': ('nfs', 'nfs4')}
_MOUNT_ESCAPE_RE = re.compile(br'\\([0-7]{3})')


def _mount_unescape(field):
    return _MOUNT_ESCAPE_RE.sub(lambda m: struct.pack('B', int(m.group(1), 8) & 0xff), field)


def read_mount_table(paths=MOUNT_TABLE_PATHS):
    """[(mount point, filesystem type)] (text) in mount order, from the kernel's mount table
    (octal escapes such as \\040 decoded); None when no table can be read."""
    for path in paths:
        try:
            handle = open(path, 'rb')
            try:
                data = handle.read()
            finally:
                handle.close()
        except EnvironmentError:
            continue
        entries = []
        for line in data.split(b'\n'):
            fields = line.split()
            if len(fields) >= 3:
                entries.append((to_text(_mount_unescape(fields[1])),
                                to_text(_mount_unescape(fields[2]))))
        return entries
    return None


def _mount_containing(real_path, mounts):
    """The (mount point, type) entry of `mounts` whose filesystem holds real_path (the last
    mounted of the deepest mount point above it), or None."""
    best = None
    for entry in mounts:
        directory = entry[0]
        if directory == '/' or real_path == directory or real_path.startswith(directory + '/'):
            if best is None or len(directory) >= len(best[0]):
                best = entry
    return best


def repository_mount_problem(repo, mounts, plain_folder_ok=False):
    """None when the repository record `repo` is there to be used, else why not (text).
    Its mount point must be a directory; when the record names a filesystem type, the mounted
    filesystem holding the mount point must be of that type; when it names none, the mount
    point must be a mount point itself. `mounts` is read_mount_table()'s answer (None: no
    table, the mount point must then differ in st_dev from its parent). `plain_folder_ok`
    (the demo) accepts any directory."""
    mount_point = repo['mount_point']
    try:
        real = os.path.realpath(mount_point)
        st = os.stat(real)
    except EnvironmentError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return u'mount point {0} does not exist'.format(mount_point)
        return u'cannot read the mount point {0}: {1}'.format(
            mount_point, to_text(e.strerror or e))
    if not stat.S_ISDIR(st.st_mode):
        return u'mount point {0} is not a directory'.format(mount_point)
    if plain_folder_ok:
        return None
    expected = to_text(repo.get('filesystem')).strip().lower()
    if mounts is None:
        try:
            parent = os.stat(os.path.join(real, '..'))
        except EnvironmentError:
            parent = st
        if st.st_dev != parent.st_dev or st.st_ino == parent.st_ino:
            return None
        return u'{0} is not a mount point (no mount table to read)'.format(mount_point)
    entry = _mount_containing(real, mounts)
    if entry is None:
        return u'no mounted filesystem holds {0}'.format(mount_point)
    if expected:
        if entry[1].lower() in _FILESYSTEM_TYPE_ALIASES.get(expected, (expected,)):
            return None
        return (u'not mounted: {0} is on the {1} filesystem mounted at {2}, not on {3}'.format(
            mount_point, entry[1], entry[0], expected))
    if entry[0] == real:
        return None
    return u'not mounted: {0} is not a mount point'.format(mount_point)


def repository_problems(repos, plain_folder_ok=False):
    """{repository id: None or why it cannot be used now} for repository records, from one
    reading of the mount table."""
    mounts = read_mount_table()
    result = {}
    for repo in repos:
        result[repo['id']] = repository_mount_problem(repo, mounts, plain_folder_ok)
    return result


def _file_type_name(mode):
    for test, name in ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a FIFO'),
                       (stat.S_ISLNK, 'a symbolic link'), (stat.S_ISSOCK, 'a socket'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device')):
        if test(mode):
            return name
    return 'not a regular file'


def _cached(cache, function, argument):
    key = (function, argument)
    if key not in cache:
        cache[key] = function(argument)
    return cache[key]


def disk_file_problem(path, mount_point, cache=None):
    """(real path, None) when `path` is a regular file whose real path (every symbolic link
    resolved) lies inside the repository at `mount_point`, on that repository's filesystem;
    else (real path or None, why not). Never opens the file. `cache`: a dict kept for one
    listing (folders' real paths, mount points' stat)."""
    if cache is None:
        cache = {}
    try:
        directory, name = posixpath.split(path)
        if name in ('', '.', '..'):
            real = os.path.realpath(path)
        else:  # a disk's folder is shared by many disks: resolve it once per listing
            real = posixpath.join(_cached(cache, os.path.realpath, directory), name)
        st = os.lstat(real)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(real)
            st = os.lstat(real)  # still a link: a loop (or too deep)
    except EnvironmentError as e:
        return None, u'cannot be read: {0}'.format(to_text(e.strerror or e))
    if stat.S_ISLNK(st.st_mode):
        try:
            os.stat(real)
            why = u'a symbolic link that cannot be resolved'
        except EnvironmentError as e:
            why = u'a symbolic link that cannot be resolved: {0}'.format(
                to_text(e.strerror or e))
        return real, why
    if not stat.S_ISREG(st.st_mode):
        return real, u'{0}, not a regular file'.format(_file_type_name(st.st_mode))
    try:
        repo_real = _cached(cache, os.path.realpath, mount_point)
        repo_st = _cached(cache, os.stat, repo_real)
    except EnvironmentError as e:
        return real, u'cannot read its repository {0}: {1}'.format(
            mount_point, to_text(e.strerror or e))
    if not real.startswith(repo_real.rstrip('/') + '/'):
        return real, u'its real path {0} is outside the repository {1}'.format(real, mount_point)
    if st.st_dev != repo_st.st_dev:
        return real, u'its real path {0} is on another filesystem than the repository {1}'.format(
            real, mount_point)
    return real, None


class NotRegularFileError(OSError):
    """open_regular_file() found something else than a regular file (errno EINVAL)."""


def open_regular_file(path):
    """A read-only descriptor of the regular file `path`; NotRegularFileError for anything else
    (a FIFO is never waited on: O_NONBLOCK)."""
    flags = (os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_NOCTTY', 0)
             | O_CLOEXEC)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, '%s is %s, not a regular file' % (
                path, _file_type_name(mode)))
    except BaseException:
        os.close(fd)
        raise
    return fd


class VmDisk(collections.namedtuple('VmDisk', 'name path device_name mode snapshot_compatible '
                                    'kind repo_id repo_mountpoint object_type reason')):
    """A disk of a VmRecord. Internal fields: kind ("file", "phy" or "cdrom"), the repository
    holding it ("" if none), its .ovsmeta OBJECT_TYPE, why it cannot be cloned ("" if it can)."""
    __slots__ = ()

    def to_json(self):  # dict(), not {...}: Python 2 then sends the keys in the order it did
        return dict(name=self.name, path=self.path, device_name=self.device_name,
                    mode=self.mode, snapshot_compatible=self.snapshot_compatible)


class VmRecord(collections.namedtuple('VmRecord', 'friendly_name name uuid disks '
                                      'snapshot_compatible config_path repo_id compat_reason '
                                      'unparsed_disks')):
    """A VM of HostInventory. Internal fields: its vm.cfg, its repository's id, why it is not
    snapshot compatible ("" if it is), the disk entries that were not understood."""
    __slots__ = ()

    def to_json(self):
        return {'friendly_name': self.friendly_name, 'name': self.name, 'uuid': self.uuid,
                'disks': [disk.to_json() for disk in self.disks],
                'snapshot_compatible': self.snapshot_compatible}


class WarnOnce(object):
    """warn(key, message) logs when a condition appears or its message changes, not every time.
    A pass (begin() ... end(), e.g. a listing) forgets the conditions it did not warn about:
    they are logged again if they come back."""

    def __init__(self):
        self._warned, self._pass = {}, None

    def __call__(self, key, message):
        if self._pass is not None:
            self._pass[key] = message
        if self._warned.get(key) != message:
            log.warning('%s', message)
            self._warned[key] = message

    def begin(self):
        self._pass = {}

    def end(self):
        self._warned, self._pass = self._pass, None


def _parse_ovsmeta_file(reader):
    def parse(path, st):
        meta, problem = {}, ''
        try:
            raw = reader(path)
            if not isinstance(raw, dict):
                raise ValueError('not a mapping')
            for name, values in raw.items():
                if isinstance(values, dict):
                    meta[to_text(name)] = dict((to_text(k), v) for k, v in values.items())
        except Exception as e:
            problem, meta = to_text(e), {}
        return Cached(_discovery_stat_key(st), meta, problem)
    return parse


def _parse_vm_cfg_file(path, st):
    """For ParsedFiles: (vm.cfg dict, [(disk entry, parse_disk_entry(entry))] or None)."""
    key = _discovery_stat_key(st)
    parsed, problem = None, ''
    try:
        cfg, st = read_vm_cfg_file(path)
        key = _discovery_stat_key(st)
        # parse the disk entries now, so that their warnings come once per file change
        entries = cfg.get('disk', [])
        disks = [(e, parse_disk_entry(e)) for e in entries] if isinstance(entries, list) else None
        parsed = (cfg, disks)
    except VmConfigError as e:
        problem = u'skipping VM: {0}'.format(to_text(e))
    except EnvironmentError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        problem = u'skipping VM: cannot read {0}: {1}'.format(path, to_text(e))
    return Cached(key, parsed, problem)


class CloneProbes(object):
    """(ok, reason) of clone_probe(mount point) per repository, kept for `ttl` seconds."""

    def __init__(self, clone_probe, ttl, clock):
        self.clone_probe = clone_probe
        self.ttl = float(ttl)
        self.clock = clock
        self.calls = 0
        self._answers = {}    # (repo id, mount point) -> Cached(time, ok, reason)

    def __call__(self, repo):
        cache_key = (repo['id'], repo['mount_point'])
        now = self.clock()
        cached = self._answers.get(cache_key)
        if cached is not None and cached.key <= now < cached.key + self.ttl:
            return cached.value, cached.problem
        if not os.path.isdir(repo['mount_point']):
            ok, reason = False, u'mount point {0} does not exist'.format(repo['mount_point'])
        else:
            self.calls += 1
            try:
                ok, reason = self.clone_probe(repo['mount_point'])
                ok, reason = bool(ok), to_text(reason)
            except Exception as e:
                ok, reason = False, u'clone probe failed: {0}'.format(to_text(e))
        self._answers[cache_key] = Cached(now, ok, reason)
        return ok, reason


class VmBuilder(object):
    """The VmRecords of one listing, from parsed vm.cfg files: each file disk is matched to a
    repository (the longest mount point above it, else the one whose .ovsmeta names it) and
    checked down to the repository's clone probe."""

    def __init__(self, repos, metas, problems, probe, warn):
        self.repos = repos          # repository records
        self.metas = metas          # repository id -> {basename: .ovsmeta fields}
        self.problems = problems    # repository id -> why it cannot be used now, or None
        self.probe = probe          # repository record -> (ok, reason)
        self.warn = warn
        self.path_cache = {}        # see disk_file_problem

    def build(self, parsed, cfg_path, dir_name, repo):
        """The VmRecord of a parsed vm.cfg of the repository `repo`, or None (warned)."""
        cfg, parsed_disks = parsed
        name = cfg.get('name')
        if not isinstance(name, text_type) or not name:
            self.warn('vm:' + cfg_path, u'skipping VM {0}: no "name" string in {1}'.format(
                dir_name, cfg_path))
            return None
        if not VM_NAME_RE.match(name):
            self.warn('vm:' + cfg_path, u'skipping VM "{0}" of {1}: the name is not usable in '
                      u'URLs (must match {2})'.format(name, cfg_path, VM_NAME_RE.pattern))
            return None
        simple_name = cfg.get('OVM_simple_name')
        if not isinstance(simple_name, text_type) or not simple_name.strip():
            simple_name = name
        vm_uuid = cfg.get('uuid') if isinstance(cfg.get('uuid'), text_type) else u''
        reasons = []
        if parsed_disks is None:
            self.warn('disk:' + cfg_path, u'{0}: "disk" is not a list; VM {1} is not snapshot '
                      u'compatible'.format(cfg_path, name))
            reasons.append('its "disk" setting is not a list')
            parsed_disks = []
        disks = []
        unparsed = []
        names_seen = {}
        for entry, parsed in parsed_disks:
            if parsed is None:
                unparsed.append(entry)
                reasons.append(u'disk entry "{0}" is not understood'.format(to_text(entry)))
            elif parsed['path']:  # else an empty CD-ROM drive: no media, nothing to list
                disks.append(self._disk(parsed, names_seen, reasons))
        if unparsed:
            self.warn('disk:' + cfg_path, u'{0}: disk entries not understood: {1}; VM {2} is '
                      'not snapshot compatible'.format(cfg_path, len(unparsed), name))
        if not unparsed and not [disk for disk in disks if disk.kind != 'cdrom']:
            reasons.append('no data disks')
        return VmRecord(simple_name, name, vm_uuid, disks, not reasons, cfg_path, repo['id'],
                        '; '.join(reasons), unparsed)

    def _disk(self, parsed, names_seen, reasons):
        path = parsed['path']
        basename = posixpath.basename(path)
        kind = 'cdrom' if parsed['cdrom'] else parsed['kind']
        repo, object_type = None, u''
        if parsed['kind'] == 'file':
            repo = self._disk_repo(path, basename)
            if repo is not None:
                meta = self.metas[repo['id']].get(basename) or {}
                object_type = to_text(meta.get('OBJECT_TYPE')).strip()
                if object_type in OVSMETA_OBJECT_TYPES_MEDIA:
                    kind = 'cdrom'
        if kind == 'cdrom':
            reason = u'CD-ROM media'
        elif basename in names_seen:
            reason = u'another disk of this VM has the same name'
            reasons.append(u'two disks are named {0}'.format(basename))
        else:
            names_seen[basename] = True
            reason = self._clone_problem(kind, path, repo, object_type)
            if reason:
                reasons.append(u'disk {0} ({1}): {2}'.format(parsed['device_name'], path, reason))
        return VmDisk(basename, path, parsed['device_name'], parsed['mode'], not reason, kind,
                      repo and repo['id'] or u'', repo and repo['mount_point'] or u'',
                      object_type, reason)

    def _disk_repo(self, path, basename):
        """The repository a file disk belongs to: longest mount_point + '/' prefix, else the one
        whose .ovsmeta lists its basename; None if none."""
        inside = [repo for repo in self.repos
                  if path.startswith(repo['mount_point'].rstrip('/') + '/')]
        if inside:
            return max(inside, key=lambda repo: len(repo['mount_point'].rstrip('/')))
        for repo in self.repos:
            if basename in self.metas[repo['id']]:
                return repo
        return None

    def _clone_problem(self, kind, path, repo, object_type):
        """Why a data disk cannot be cloned, or "" when it can."""
        if kind == 'phy':
            return u'physical device (phy:) cannot be cloned'
        if repo is None:
            return u'not in a known repository'
        if object_type not in OVSMETA_OBJECT_TYPES_CLONABLE:
            return u'repository metadata says {0}, not VIRTUAL_DISK'.format(object_type)
        if self.problems.get(repo['id']):
            return u'repository {0} cannot be used now: {1}'.format(
                repo['id'], self.problems[repo['id']])
        why = disk_file_problem(path, repo['mount_point'], self.path_cache)[1]
        if why:
            return why
        ok, why = self.probe(repo)
        if ok:
            return u''
        return u'repository {0} cannot clone files: {1}'.format(repo['id'], why)


class HostInventory(object):
    """The VMs of this host, found in every repository's VirtualMachines/*/vm.cfg.

    repositories_loader() -> list of repository records (see make_repository_record);
    ovsmeta_reader(path) -> {basename: {"OBJECT_TYPE": ..., "SIMPLE_NAME": ...}};
    clone_probe(directory) -> (bool, reason text);
    check_mounts(repositories) -> {repository id: None, or why it cannot be used now} (see
    repository_problems; None: every repository is taken as mounted). A repository that cannot
    be used is neither listed, probed nor written to, and its disks are not snapshot compatible.
    vm.cfg files are re-parsed only when their (mtime, size, inode) change, directories are
    listed on every call, clone probes are cached per repository for probe_ttl seconds.
    A problem (unmounted repository, broken vm.cfg, bad VM name) is logged once when it
    appears, not on every listing. Thread-safe."""

    def __init__(self, repositories_loader, ovsmeta_reader, clone_probe, probe_ttl=300.0,
                 clock=time.time, check_mounts=None):
        self.repositories_loader = repositories_loader
        self.check_mounts = check_mounts
        self._lock = threading.RLock()
        self.vm_cfgs = ParsedFiles(_parse_vm_cfg_file)  # .reads: for tests and the benchmark
        self._metas = ParsedFiles(_parse_ovsmeta_file(ovsmeta_reader))
        self.probes = CloneProbes(clone_probe, probe_ttl, clock)
        self._warn = WarnOnce()
        self._repos = []

    def _load_repositories(self):
        try:
            repos = self.repositories_loader()
        except Exception as e:
            self._warn('repositories', u'cannot read the repository list ({0}); using the last '
                       u'one read ({1} repositories)'.format(to_text(e), len(self._repos)))
            return self._repos
        clean = []
        for repo in repos:
            if not isinstance(repo, dict):
                self._warn('repo-type', u'the repository list holds a {0}, not a record; '
                           u'ignored'.format(type(repo).__name__))
                continue
            record = make_repository_record(repo.get('id'), repo)
            if not record['id'] or not record['mount_point'].startswith('/'):
                self._warn('repo-bad:' + record['id'], u'repository "{0}": no id or mount point; '
                           u'ignored'.format(record['id']))
                continue
            clean.append(record)
        self._repos = clean
        return clean

    def repositories(self):
        """The current repository records (copies)."""
        with self._lock:
            return [dict(r) for r in self._load_repositories()]

    def _mount_problems(self, repos):
        if self.check_mounts is None:
            return {}
        try:
            return self.check_mounts(repos)
        except Exception as e:
            problem = u'cannot check the mounts: {0}'.format(to_text(e))
            return dict((repo['id'], problem) for repo in repos)

    def mount_problems(self, mount_points):
        """{mount point: None when the repository there can be used now, else why not}. A mount
        point that no repository names any more must be a mount point itself."""
        with self._lock:
            by_mount_point = dict((r['mount_point'], r) for r in self._load_repositories())
        repos = [dict(by_mount_point.get(mount_point)
                      or make_repository_record(u'', {'mount_point': mount_point}), id=mount_point)
                 for mount_point in mount_points]
        problems = self._mount_problems(repos)
        return dict((mount_point, problems.get(mount_point)) for mount_point in mount_points)

    def _ovsmeta(self, repo):
        path = os.path.join(repo['mount_point'], '.ovsmeta')
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, 'not a regular file')
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._warn('ovsmeta:' + repo['id'], u'repository {0}: cannot read {1}: {2}'.format(
                    repo['id'], path, to_text(e)))
            return {}
        entry = self._metas.get(path, st)
        if entry.problem:
            self._warn('ovsmeta:' + repo['id'], u'repository {0}: ignoring unreadable {1}: '
                       u'{2}'.format(repo['id'], path, entry.problem))
        return entry.value

    def _read_cfg(self, path):
        """(parsed vm.cfg or None, problem text). Parses only when the file changed."""
        try:
            st = os.stat(path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None, ''  # not a VM directory (or one being created / removed)
            return None, u'cannot read {0}: {1}'.format(path, to_text(e))
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the listing until written to
            return None, u'skipping VM: {0} is {1}, not a regular file'.format(
                path, _file_type_name(st.st_mode))
        entry = self.vm_cfgs.get(path, st) or Cached(None, None, '')  # None: gone meanwhile
        return entry.value, entry.problem

    def _vm_folders(self, repo, problems):
        """The sorted names in the repository's VirtualMachines folder; [] (warned) when it
        cannot be listed, and then what was parsed there is kept for when it is back."""
        vm_root = os.path.join(repo['mount_point'], 'VirtualMachines')
        names = None
        if problems.get(repo['id']):
            self._warn('repo:' + repo['id'], u'repository {0} ({1}) cannot be used now: {2}; '
                       u'its VMs are not listed and nothing is written there'.format(
                           repo['id'], repo['alias'] or repo['mount_point'], problems[repo['id']]))
        else:
            try:
                names = os.listdir(vm_root)
            except OSError as e:
                if os.path.isdir(repo['mount_point']) and e.errno == errno.ENOENT:
                    return []  # mounted repository without VMs
                self._warn('repo:' + repo['id'], u'repository {0} ({1}): cannot list {2}: {3}; '
                           u'its VMs are not listed'.format(
                               repo['id'], repo['alias'] or repo['mount_point'], vm_root,
                               to_text(e.strerror or e)))
        if names is None:
            self.vm_cfgs.keep(repo['mount_point'].rstrip('/'))
            self._metas.keep(repo['mount_point'].rstrip('/'))
            return []
        ascii_names = []
        for name in names:
            if isinstance(name, bytes) or not _discovery_is_ascii(name):
                # OVM names VM directories after the VM id (hex). Python 2 gives bytes for
                # names it cannot decode; Python 3 surrogate escapes: skip them on both.
                self._warn('dir:' + vm_root + '/' + repr(name), u'{0}: ignoring the directory '
                           u'{1}: not an ASCII name'.format(vm_root, repr(name)))
            else:
                ascii_names.append(name)
        return sorted(ascii_names)

    def list_vms(self):
        """Every VM of every repository (VmRecords), sorted by friendly_name then name."""
        with self._lock:
            repos = self._load_repositories()
            self._warn.begin()
            self.vm_cfgs.begin()
            self._metas.begin()
            problems = self._mount_problems(repos)
            metas = {}
            for repo in repos:
                metas[repo['id']] = {} if problems.get(repo['id']) else self._ovsmeta(repo)
            builder = VmBuilder(repos, metas, problems, self.probes, self._warn)
            vms = []
            by_name = {}
            for repo in repos:
                for dir_name in self._vm_folders(repo, problems):
                    cfg_path = os.path.join(repo['mount_point'], 'VirtualMachines', dir_name,
                                            'vm.cfg')
                    parsed, problem = self._read_cfg(cfg_path)
                    if problem:
                        self._warn('vm:' + cfg_path, problem)
                    vm = parsed and builder.build(parsed, cfg_path, dir_name, repo)
                    if not vm:
                        continue
                    if vm.name in by_name:
                        self._warn('dup:' + cfg_path, u'skipping {0}: VM name {1} is already '
                                   u'used by {2}'.format(cfg_path, vm.name,
                                                         by_name[vm.name].config_path))
                        continue
                    by_name[vm.name] = vm
                    vms.append(vm)
            self.vm_cfgs.end()
            self._metas.end()
            self._warn.end()  # conditions that went away may be logged again if they come back
        vms.sort(key=lambda vm: (vm.friendly_name, vm.name))
        return vms

    def get_vm(self, vm_id):
        """The VmRecord named vm_id, or None."""
        if not isinstance(vm_id, (bytes, text_type)):
            return None
        vm_id = to_text(vm_id)
        if not VM_NAME_RE.match(vm_id):
            return None
        for vm in self.list_vms():
            if vm.name == vm_id:
                return vm
        return None


def format_vm_table(vms):
    """An aligned plain-text table of VmRecords for the `vms` command."""
    rows = [(u'FRIENDLY NAME', u'NAME', u'SNAPSHOT', u'DISKS')]
    for vm in vms:
        disks = [u'{0}:{1}({2})'.format(to_text(disk.device_name), to_text(disk.name),
                                        disk.snapshot_compatible and u'yes' or u'no')
                 for disk in vm.disks]
        rows.append((to_text(vm.friendly_name), to_text(vm.name),
                     vm.snapshot_compatible and u'yes' or u'no', u' '.join(disks) or u'-'))
    widths = [max([len(row[i]) for row in rows]) for i in range(3)]
    lines = [u'  '.join([row[i].ljust(widths[i]) for i in range(3)] + [row[3]]).rstrip()
             for row in rows]
    if not vms:
        lines.append(u'(no VMs found)')
    return u'\n'.join(lines) + u'\n'

# ------------------------------------------------ clones, FIEMAP extent maps, chunk diffs ---
#
# Everything the exporter does with the blocks of a disk file:
#   * clone_file(src, dst)        - a copy-on-write clone: OCFS2_IOC_REFLINK first (OVM's OCFS2
#                                   on UEK4), then the VFS FICLONE (XFS, btrfs, OCFS2 >= 4.10).
#                                   Failures raise CloneError; the destination is never left
#                                   behind by a failed clone.
#   * clone_supported(directory)  - probe: clone a 4 KiB scratch file inside `directory`.
#   * fiemap(fd)                  - the file's extent map (FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC,
#                                   paged), as a FiemapExtents object.
#   * data_chunks(extents, size)  - the snapshot's "chunks": written extents, clamped to size.
#   * squash_chunks(chunks)       - merge chunks that touch.
#   * diff_chunks(old, new, size) - compareTo: every byte range whose content may differ.
#
# Extent representation (what fiemap() returns, what the chunk functions take):
#   FiemapExtents holds four parallel arrays of unsigned 64-bit integers, `logical`, `length`,
#   `physical` and `flags` (32 bytes per extent: 1,000,000 extents take 32 MB, not the ~170 MB a
#   list of tuples would). Iterating it, or indexing it, gives (logical, length, physical, flags)
#   tuples. Every chunk function also accepts a plain list of such 4-tuples.
#
# diff_chunks() compares, for every byte offset, the physical address each snapshot maps it
# to. An extent maps offset x to physical + (x - logical), so two extents hold the same, shared
# data exactly where physical - logical is equal on both sides. Each side is first reduced to
# sorted, non-overlapping runs (lists starts, ends, physicals, mostly built by C loops):
# unwritten extents are dropped (they read as zeros, like holes), extents with an unreliable
# address get physical None (always "changed"). Then one merge sweep over both run lists,
# O(n + m); runs identical on both sides (the common case) cost a few comparisons each.
# Defensive cases the kernel never produces: unsorted input is sorted; where extents overlap,
# both runs become unreliable (reported, never missed).
#
# Unreliable physical address: FIEMAP_EXTENT_UNKNOWN, DELALLOC, ENCODED, DATA_INLINE,
# NOT_ALIGNED, and also DATA_TAIL and DATA_ENCRYPTED. Encrypted extents do have real addresses,
# but whether equal ciphertext blocks mean equal plaintext depends on the filesystem's key and
# IV scheme; counting them as changed costs some bytes, never correctness (and OVM's OCFS2
# has no encryption). SHARED says nothing about change (OCFS2 leaves it stale) and is ignored.



OCFS2_IOC_REFLINK = 0x40186F04      # _IOW('o', 4, struct reflink_arguments{u64 old, new, preserve})
FICLONE = 0x40049409                # _IOW(0x94, 9, int)
FS_IOC_FIEMAP = 0xC020660B          # _IOWR('f', 11, struct fiemap)

FIEMAP_FLAG_SYNC = 0x1
FIEMAP_MAX_OFFSET = 0xFFFFFFFFFFFFFFFF

FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x80
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_SHARED = 0x2000

FIEMAP_EXTENT_UNRELIABLE = (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC |
                            FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_DATA_ENCRYPTED |
                            FIEMAP_EXTENT_NOT_ALIGNED | FIEMAP_EXTENT_DATA_INLINE |
                            FIEMAP_EXTENT_DATA_TAIL)

_FIEMAP_HEADER = struct.Struct('=QQIIII')   # fm_start fm_length fm_flags fm_mapped_extents
                                            # fm_extent_count fm_reserved (32 bytes)
_FIEMAP_EXTENT_SIZE = 56                    # 7 u64 words: logical physical length res res
                                            # flags(u32)+res(u32) res res
_FIEMAP_DEFAULT_BATCH = 8192

# errnos meaning "this filesystem/kernel cannot do that clone ioctl" (515 = ENOIOCTLCMD, which
# should never reach user space, but some kernels leaked it).
_CLONE_UNSUPPORTED_ERRNOS = (errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                             getattr(errno, 'ENOTSUP', errno.EOPNOTSUPP), 515)
_CLONE_PROBE_PREFIX = '.ovm-exporter-probe-'
# Probe files carry the host name: repositories are shared by the servers of a pool.
_CLONE_PROBE_HOST_PREFIX = '%s%s-' % (_CLONE_PROBE_PREFIX,
                                      re.sub(r'[^A-Za-z0-9.-]', '_', socket.gethostname()))



def _u64_typecode():
    for code in ('L', 'Q'):     # Python 2 has no 'Q'; 'L' is 8 bytes on 64-bit Linux
        try:
            if array.array(code).itemsize == 8:
                return code
        except ValueError:
            pass
    raise RuntimeError('no 8-byte unsigned array type on this platform')


_U64_TYPECODE = _u64_typecode()


# ------------------------------------------------------------------------------------ clone --

class CloneError(EnvironmentError):
    """A clone failed. .errno is the kernel's errno, str() a sentence naming both paths,
    .cannot_clone is True when the filesystem (or kernel) cannot clone files at all."""

    def __init__(self, err, message, src_path=None, dst_path=None, cannot_clone=False):
        EnvironmentError.__init__(self, err, message)
        self.src_path = src_path
        self.dst_path = dst_path
        self.cannot_clone = cannot_clone

    def __str__(self):
        return self.strerror


def _clone_error(err, src_path, dst_path, detail=None):
    if err in _CLONE_UNSUPPORTED_ERRNOS:
        reason = 'the filesystem of {0} cannot clone files (no reflink support)'.format(
            text_repr(src_path))
    elif err == errno.EXDEV:
        reason = '{0} and {1} are on different filesystems or mounts'.format(
            text_repr(src_path), text_repr(dst_path))
    elif err == errno.ENOSPC:
        reason = 'no space left on the filesystem'
    elif err == getattr(errno, 'EDQUOT', None):
        reason = 'disk quota exceeded'
    elif err == errno.EEXIST:
        reason = 'the destination {0} already exists'.format(text_repr(dst_path))
    elif err == errno.ENOENT:
        reason = 'the source or the destination directory does not exist'
    elif err in (errno.EPERM, errno.EACCES):
        reason = 'permission denied (or the source is not a regular file)'
    elif err == errno.EISDIR:
        reason = 'the source is a directory'
    elif err == errno.EROFS:
        reason = 'the filesystem is read-only'
    else:
        reason = os.strerror(err) if err else 'unknown error'
    message = 'cannot clone {0} to {1}: {2}'.format(text_repr(src_path), text_repr(dst_path),
                                                     reason)
    if detail:
        message = '{0} ({1})'.format(message, detail)
    return CloneError(err, message, src_path, dst_path, err in _CLONE_UNSUPPORTED_ERRNOS)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except EnvironmentError:
        pass


def _ocfs2_reflink(src_path, dst_path):
    """OCFS2_IOC_REFLINK with preserve=1 (uid, gid, mode, mtime copied). Paths are passed to
    the kernel by address; the ioctl's fd only selects the filesystem."""
    old_path = array.array('b', _path_to_bytes(src_path) + b'\0')
    new_path = array.array('b', _path_to_bytes(dst_path) + b'\0')
    args = struct.pack('=QQQ', old_path.buffer_info()[0], new_path.buffer_info()[0], 1)
    fd = open_regular_file(src_path)
    try:
        fcntl.ioctl(fd, OCFS2_IOC_REFLINK, args)
    finally:
        os.close(fd)
    # old_path/new_path stay referenced until here, so their buffers outlive the ioctl
    return len(old_path) + len(new_path)


def _ficlone(src_path, dst_path):
    """FICLONE into a new file (O_EXCL), then copy mode, owner and times from the source like
    the reflink's preserve=1 does. A failed clone removes the file it created."""
    cloexec = O_CLOEXEC
    src_fd = open_regular_file(src_path)
    try:
        st = os.fstat(src_fd)
        dst_fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | cloexec, 0o600)
        try:
            try:
                fcntl.ioctl(dst_fd, FICLONE, src_fd)
                os.fchmod(dst_fd, st.st_mode & 0o7777)
                try:
                    os.fchown(dst_fd, st.st_uid, st.st_gid)
                except EnvironmentError as e:
                    if e.errno not in (errno.EPERM, errno.EACCES):
                        raise
            finally:
                os.close(dst_fd)
            os.utime(dst_path, (st.st_atime, st.st_mtime))
        except BaseException:
            _remove_quietly(dst_path)
            raise
    finally:
        os.close(src_fd)


def clone_file(src_path, dst_path):
    """Clone src_path to the new file dst_path (which must not exist). Returns the method used,
    'ocfs2_reflink' or 'ficlone'. Raises CloneError; dst_path is never left behind on failure
    (and an existing dst_path is never touched). A source that is not a regular file is only
    opened for a check that does not block (a FIFO)."""
    try:
        return _clone_file(src_path, dst_path)
    except NotRegularFileError as e:  # not "cannot clone", although its errno is EINVAL
        raise CloneError(e.errno, 'cannot clone %s to %s: %s' % (
            text_repr(src_path), text_repr(dst_path), e.strerror), src_path, dst_path)


def _clone_file(src_path, dst_path):
    try:
        _ocfs2_reflink(src_path, dst_path)
        return 'ocfs2_reflink'
    except NotRegularFileError:
        raise
    except EnvironmentError as e:
        if e.errno not in _CLONE_UNSUPPORTED_ERRNOS:
            raise _clone_error(e.errno, src_path, dst_path)
        reflink_errno = e.errno
    try:
        _ficlone(src_path, dst_path)
        return 'ficlone'
    except NotRegularFileError:
        raise
    except EnvironmentError as e:
        detail = None
        if e.errno in _CLONE_UNSUPPORTED_ERRNOS:
            detail = 'OCFS2 reflink: {0}; FICLONE: {1}'.format(
                os.strerror(reflink_errno), os.strerror(e.errno))
        raise _clone_error(e.errno, src_path, dst_path, detail)


# A full repository cannot be probed; a snapshot attempt will then say "no space" (507),
# which is more useful to the admin than "not snapshot compatible".
_CLONE_PROBE_FULL = 'cannot probe {0} for cloning: no space left; assuming it can clone'


def clone_supported(directory, create=False):
    """(True, text) when files in `directory` can be cloned, else (False, reason). Creates and
    removes a 4 KiB scratch file named .ovm-exporter-probe-* and its clone; leaves nothing.
    With `create`, a missing `directory` is made first (mode 0700)."""
    src = None
    dst = None
    dst_made = False
    try:
        try:
            if create and not os.path.isdir(directory):
                os.mkdir(directory, 0o700)
            fd, src = tempfile.mkstemp(prefix=_CLONE_PROBE_HOST_PREFIX, dir=directory)
            try:
                data = b'ovm-exporter clone probe\n' * 164
                data = data[:4096]
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            dst = src + '-clone'
            method = clone_file(src, dst)
            dst_made = True
            return True, 'files in {0} can be cloned ({1})'.format(text_repr(directory), method)
        except EnvironmentError as e:
            if e.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC)):
                return True, _CLONE_PROBE_FULL.format(text_repr(directory))
            if isinstance(e, CloneError):
                return False, str(e)
            return False, 'cannot probe {0} for cloning: {1}'.format(
                text_repr(directory), e.strerror or e)
    finally:
        if dst_made:
            _remove_quietly(dst)
        if src is not None:
            _remove_quietly(src)


# ----------------------------------------------------------------------------------- FIEMAP --

class FiemapExtents(object):
    """A file's extent map: parallel arrays logical[], length[], physical[], flags[] (byte
    offsets/lengths, kernel FIEMAP flags), sorted by logical as the kernel reports them.
    Iteration and indexing give (logical, length, physical, flags) tuples."""

    __slots__ = ('logical', 'length', 'physical', 'flags')

    def __init__(self, logical=None, length=None, physical=None, flags=None):
        self.logical = logical if logical is not None else array.array(_U64_TYPECODE)
        self.length = length if length is not None else array.array(_U64_TYPECODE)
        self.physical = physical if physical is not None else array.array(_U64_TYPECODE)
        self.flags = flags if flags is not None else array.array(_U64_TYPECODE)

    @classmethod
    def from_tuples(cls, items):
        result = cls()
        for logical, length, physical, flags in items:
            result.logical.append(logical)
            result.length.append(length)
            result.physical.append(physical)
            result.flags.append(flags)
        return result

    def __len__(self):
        return len(self.logical)

    def __iter__(self):
        return izip(self.logical, self.length, self.physical, self.flags)

    def __getitem__(self, index):
        return (self.logical[index], self.length[index], self.physical[index],
                self.flags[index])

    def tuples(self):
        return list(izip(self.logical, self.length, self.physical, self.flags))

    def __eq__(self, other):
        if isinstance(other, FiemapExtents):
            return self.tuples() == other.tuples()
        return self.tuples() == list(other)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = None

    def __repr__(self):
        return 'FiemapExtents(<{0} extents>)'.format(len(self))


def _fiemap_decode(raw, count):
    """`count` struct fiemap_extent records (an array('B') or bytes) -> four u64 arrays
    logical, physical, length, flags. Each record is 7 native u64 words: logical, physical,
    length, 2 reserved, flags (u32) + reserved u32, reserved; stride slicing is C-speed."""
    words = array.array(_U64_TYPECODE)
    if not isinstance(raw, bytes):
        raw = _array_tobytes(raw)
    _array_frombytes(words, raw[:_FIEMAP_EXTENT_SIZE * count])
    if sys.byteorder == 'little':   # the u32 fe_flags is the low half of word 5
        flags = map(operator.and_, words[5::7], itertools.repeat(0xFFFFFFFF, count))
    else:                           # big endian: the high half
        flags = map(operator.rshift, words[5::7], itertools.repeat(32, count))
    return words[0::7], words[1::7], words[2::7], array.array(_U64_TYPECODE, flags)


def fiemap(fd, batch=_FIEMAP_DEFAULT_BATCH):
    """The extent map of an open file (fd or object with fileno()) as FiemapExtents, asking
    FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC for `batch` extents per call until the LAST flag.
    Raises EnvironmentError from the kernel (EOPNOTSUPP: the filesystem has no FIEMAP)."""
    if hasattr(fd, 'fileno'):
        fd = fd.fileno()
    batch = max(1, int(batch))
    # A mutable array: Python 2 copies immutable ioctl arguments into a 1 KiB buffer, and its
    # fcntl.ioctl refuses a bytearray.
    buf = array.array('B', b'\0' * (_FIEMAP_HEADER.size + _FIEMAP_EXTENT_SIZE * batch))
    result = FiemapExtents()
    start = 0
    while True:
        buf[0:_FIEMAP_HEADER.size] = array.array('B', _FIEMAP_HEADER.pack(
            start, FIEMAP_MAX_OFFSET - start, FIEMAP_FLAG_SYNC, 0, batch, 0))
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _FIEMAP_HEADER.unpack(_array_tobytes(buf[0:_FIEMAP_HEADER.size]))[3]
        if mapped == 0:
            break
        mapped = min(mapped, batch)
        logical, physical, length, flags = _fiemap_decode(
            buf[_FIEMAP_HEADER.size:_FIEMAP_HEADER.size + _FIEMAP_EXTENT_SIZE * mapped],
            mapped)
        skip = 0    # an extent that began before fm_start may be reported again: drop it
        while skip < mapped and logical[skip] + length[skip] <= start:
            skip += 1
        if skip:
            logical, physical, length, flags = (
                logical[skip:], physical[skip:], length[skip:], flags[skip:])
        result.logical.extend(logical)
        result.length.extend(length)
        result.physical.extend(physical)
        result.flags.extend(flags)
        if flags and flags[-1] & FIEMAP_EXTENT_LAST:
            break
        if not logical:
            break
        next_start = logical[-1] + length[-1]
        if next_start <= start or next_start >= FIEMAP_MAX_OFFSET:
            log.warning('FIEMAP made no progress at offset %d; extent map may be partial',
                        start)
            break
        start = next_start
    return result


def file_extents(path):
    """(FiemapExtents, size) of the file at `path`, both read through one descriptor."""
    fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return fiemap(fd), size
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ chunk arithmetic --

def _extent_columns(extents):
    if isinstance(extents, FiemapExtents):
        return extents.logical, extents.length, extents.physical, extents.flags
    items = list(extents)
    if not items:
        return (), (), (), ()
    columns = list(zip(*items))
    return columns[0], columns[1], columns[2], columns[3]


def _select(values, keep):
    if compress is not None:
        return list(compress(values, keep))
    return [v for v, k in izip(values, keep) if k]


def _extent_runs(extents, limit):
    """Written extents as sorted, non-overlapping runs inside [0, limit): lists starts, ends,
    physicals (address at start; None = unreliable address) and a dict start -> address of the
    unreliable runs. Unwritten extents are left out: they read as zeros."""
    logical, length, physical, flags = _extent_columns(extents)
    if not len(logical) or limit <= 0:
        return [], [], [], {}
    unreliable = {}
    odd = [f for f in set(flags) if f & (FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_UNRELIABLE)]
    if odd:     # left out unwritten extents; note the unreliable ones (list comprehensions)
        unwritten = set([f for f in odd if f & FIEMAP_EXTENT_UNWRITTEN])
        if unwritten:
            keep = [f not in unwritten for f in flags]
            logical, length, physical, flags = (_select(logical, keep), _select(length, keep),
                                                _select(physical, keep), _select(flags, keep))
        bad = set([f for f in odd if not f & FIEMAP_EXTENT_UNWRITTEN])
        bad_index = [k for k, f in enumerate(flags) if f in bad] if bad else []
    starts = list(logical)
    if not starts:
        return [], [], [], {}
    ends = list(map(operator.add, logical, length))
    physicals = list(physical)
    # sorted, not overlapping, no empty extent (always so from the kernel)? else the slow way
    if 0 in length or not all(map(operator.le, itertools.islice(ends, 0, len(ends) - 1),
                                  itertools.islice(starts, 1, None))):
        return _extent_runs_slow(logical, length, physical, flags, limit)
    if odd:
        for k in bad_index:
            unreliable[starts[k]] = physicals[k]
            physicals[k] = None
    cut = bisect.bisect_left(starts, limit)
    if cut < len(starts):
        del starts[cut:], ends[cut:], physicals[cut:]
    if ends and ends[-1] > limit:
        ends[-1] = limit
    return starts, ends, physicals, unreliable


def _extent_runs_slow(logical, length, physical, flags, limit):
    """_extent_runs for input the kernel never gives: unsorted is sorted; where extents
    overlap, both runs become unreliable (reported as changed, never missed)."""
    starts, ends, physicals, unreliable = [], [], [], {}
    prev_end = 0
    for lo, ln, ph, fl in sorted(izip(logical, length, physical, flags)):
        if ln <= 0 or fl & FIEMAP_EXTENT_UNWRITTEN or lo >= limit:
            continue
        end = min(lo + ln, limit)
        trusted = not fl & FIEMAP_EXTENT_UNRELIABLE
        if starts and lo < prev_end:
            if physicals[-1] is not None:
                unreliable[starts[-1]] = physicals[-1]
                physicals[-1] = None
            if end <= prev_end:
                continue
            ph += prev_end - lo
            lo = prev_end
            trusted = False
        starts.append(lo)
        ends.append(end)
        if trusted:
            physicals.append(ph)
        else:
            physicals.append(None)
            unreliable[lo] = ph
        prev_end = end
    return starts, ends, physicals, unreliable


def data_chunks(extents, size):
    """The snapshot's chunks: written extents (unwritten ones read as zeros and are left out),
    clamped to the file size, sorted: [{"start", "length", "physical_start"}]."""
    starts, ends, physicals, unreliable = _extent_runs(extents, size)
    return [{'start': s, 'length': e - s,
             'physical_start': p if p is not None else unreliable[s]}
            for s, e, p in izip(starts, ends, physicals)]


def squash_chunks(chunks):
    """Merge chunks that touch (a.start + a.length == b.start) and have the same "zero" flag;
    a merged chunk keeps its first chunk's physical_start. Returns new dicts, sorted."""
    result = []
    last = None
    for chunk in sorted(chunks, key=operator.itemgetter('start')):
        zero = bool(chunk.get('zero'))
        if (last is not None and bool(last.get('zero')) == zero and
                last['start'] + last['length'] == chunk['start']):
            last['length'] += chunk['length']
            continue
        last = {'start': chunk['start'], 'length': chunk['length'],
                'physical_start': chunk['physical_start']}
        if zero:
            last['zero'] = True
        result.append(last)
    return result


def diff_chunks(old_extents, new_extents, new_size, old_size=None):
    """compareTo: the chunks a client must rewrite, reading the newer snapshot, to turn its
    image of the older snapshot into the newer one. For every offset in [0, new_size):
      - the newer maps it to written data and the older maps it to nothing, to unwritten
        space, to a different physical address, or either address is unreliable
        -> data chunk {"start", "length", "physical_start"} (newer address at start);
      - the newer maps it to a hole or unwritten space and the older to written data
        -> {"start", "length", "physical_start": 0, "zero": True}.
    old_size (optional): the older snapshot's size; its extents past it are then ignored,
    so data the newer file has past the old end is always sent. Output sorted; neighbouring
    pieces are merged when they touch (data pieces only when also physically contiguous)."""
    old_limit = new_size if old_size is None else min(old_size, new_size)
    o_start, o_end, o_phys, _o_unreliable = _extent_runs(old_extents, old_limit)
    n_start, n_end, n_phys, n_unreliable = _extent_runs(new_extents, new_size)
    out = []    # (start, end, physical at start, or None for zeros), in order
    emit = out.append
    sentinel = new_size + 1     # an old run past every new offset: no bounds checks below
    o_start.append(sentinel)
    o_end.append(sentinel)
    o_phys.append(None)
    i = 0
    prev_end = 0
    for s, e, p in izip(n_start, n_end, n_phys):
        if o_start[i] == s:
            if o_end[i] == e and o_phys[i] == p and p is not None:
                i += 1      # the same run in both: unchanged
                prev_end = e
                continue
        else:
            # older data in the gap [prev_end, s) the newer does not map: zeros
            while o_start[i] < s:
                a = o_start[i] if o_start[i] > prev_end else prev_end
                b = o_end[i] if o_end[i] < s else s
                if a < b:
                    emit((a, b, None))
                if o_end[i] <= s:
                    i += 1
                else:
                    break
        prev_end = e
        # [s, e): the newer maps it to data
        delta = None if p is None else p - s       # physical(x) = x + delta
        base = n_unreliable[s] - s if p is None else delta
        cur = s
        while cur < e:
            if o_start[i] < e:
                a = o_start[i]
                if a > cur:     # the older has nothing in [cur, a)
                    emit((cur, a, cur + base))
                else:
                    a = cur
                b = o_end[i] if o_end[i] < e else e
                if delta is None or o_phys[i] is None or o_phys[i] - o_start[i] != delta:
                    emit((a, b, a + base))
                cur = b
                if o_end[i] <= e:
                    i += 1
            else:
                emit((cur, e, cur + base))
                cur = e
    while i < len(o_start) - 1:     # older data past the newer's last extent
        a = max(o_start[i], prev_end)
        if a < o_end[i]:
            emit((a, o_end[i], None))
        i += 1

    chunks = []     # merge pieces that touch (data pieces: when physically contiguous too)
    last = None
    for a, b, phys in out:
        if last is not None and last['start'] + last['length'] == a:
            if phys is None:
                if 'zero' in last:
                    last['length'] = b - last['start']
                    continue
            elif 'zero' not in last and last['physical_start'] + last['length'] == phys:
                last['length'] = b - last['start']
                continue
        if phys is None:
            last = {'start': a, 'length': b - a, 'physical_start': 0, 'zero': True}
        else:
            last = {'start': a, 'length': b - a, 'physical_start': phys}
        chunks.append(last)
    return chunks

# ------------------------------------------------------------------------ range checksums ---
#
# The checksum route and `client download --verify`: sha256 of a byte range of a disk as a GET
# with that Range returns it, and optionally one sha256 per block of the range. Holes and
# unwritten extents (FIEMAP) are hashed as zeros without being read.

CHECKSUM_MAX_BLOCKS = 100000
_ZERO_PIECE = b'\0' * (1 << 20)


class _RangeHasher(object):
    """sha256 of everything fed, and with block_size one sha256 per block_size bytes."""

    def __init__(self, block_size=None):
        self.total = hashlib.sha256()
        self.block_size = block_size
        self.blocks = [] if block_size else None
        self.block = hashlib.sha256()
        self.filled = 0
        self.zero_block = None

    def update(self, data):
        self.total.update(data)
        if self.blocks is None:
            return
        offset, count = 0, len(data)
        while offset < count:
            take = min(count - offset, self.block_size - self.filled)
            self.block.update(data[offset:offset + take])
            offset += take
            self.filled += take
            if self.filled == self.block_size:
                self.blocks.append(self.block.hexdigest())
                self.block, self.filled = hashlib.sha256(), 0

    def zeros(self, count):
        while count > 0:
            if self.blocks is not None and self.filled == 0 and count >= self.block_size:
                whole = count // self.block_size
                if self.zero_block is None:
                    zero = hashlib.sha256()
                    _hash_zeros(zero.update, self.block_size)
                    self.zero_block = zero.hexdigest()
                self.blocks.extend([self.zero_block] * whole)
                _hash_zeros(self.total.update, whole * self.block_size)
                count -= whole * self.block_size
                continue
            piece = min(count, len(_ZERO_PIECE))
            if self.blocks is not None:
                piece = min(piece, self.block_size - self.filled)
            self.update(_ZERO_PIECE if piece == len(_ZERO_PIECE) else _ZERO_PIECE[:piece])
            count -= piece

    def result(self):
        if self.blocks is not None and self.filled:
            self.blocks.append(self.block.hexdigest())
            self.filled = 0
        return self.total.hexdigest(), self.blocks


def _hash_zeros(update, count):
    piece = len(_ZERO_PIECE)
    for _ in range(count // piece):
        update(_ZERO_PIECE)
    if count % piece:
        update(_ZERO_PIECE[:count % piece])


def range_checksums(handle, extents, size, start, length, block_size=None, buffer=None):
    """(sha256 hex of bytes [start, start + length) of an open file, [sha256 hex per block] or
    None). `extents`: the file's extent map (holes and unwritten ranges are hashed as zeros,
    not read), or None to read everything. `size` is the file size; the range lies inside."""
    end = start + length
    if extents is None:
        data = [(start, end)]
    else:
        data = [(c['start'], c['start'] + c['length']) for c in data_chunks(extents, size)]
    hasher = _RangeHasher(block_size)
    buffer = buffer if buffer is not None else bytearray(STREAM_BUFFER_SIZE)
    position = start
    for first, last in data:
        first, last = max(first, position), min(last, end)
        if first >= last:
            continue
        hasher.zeros(first - position)
        stream_file(handle, hasher.update, first, last - first, buffer)
        position = last
    hasher.zeros(end - position)
    return hasher.result()

# ---------------------------------------------------------------- Xen domains: pausing ---
#
# A running VM is a Xen domain named after the VM id (vm.cfg `name`). Pausing it stops its vCPUs:
# clones of all its disks taken while it is paused show one instant, as a power cut would
# (crash-consistent; nothing inside the guest is flushed or quiesced, so not
# application-consistent). The toolstack is `xl` (OVM 3.4), else `xm`.
#
# The domain must never stay paused. DomainPause forks a watchdog before pausing: a child that
# keeps only the read end of a pipe and unpauses the domain as soon as that pipe reports EOF
# (release() closes the write end: the normal way, after errors too; the kernel closes it
# when the exporter dies, even by SIGKILL) or when snapshot_pause_max has passed. So exactly one
# process unpauses, always the watchdog. The pause is also recorded in the store beforehand, and
# start-up unpauses a domain that is still recorded (both processes killed at once).

TOOLSTACK_NAMES = ('xl', 'xm')
TOOLSTACK_TIMEOUT = 10.0
TOOLSTACK_OUTPUT_LIMIT = 4096
# exit status bits of the watchdog child
WATCHDOG_OVERRAN = 1
WATCHDOG_UNPAUSE_FAILED = 2
WATCHDOG_CRASHED = 4
WATCHDOG_UNPAUSE_ATTEMPTS = 3
# release() kills a watchdog still running this long after its deadline and its unpause tries
WATCHDOG_REAP_MARGIN = 5.0
# what `xl list NAME` / `xm list NAME` print for a domain that does not exist on this server
NO_SUCH_DOMAIN_RE = re.compile(
    r'invalid domain identifier|domain\b[^\n]*\b(does not exist|not found)', re.I)
# Python 3.12+ warns about every fork in a process with threads; the watchdog child only makes
# system calls (see _watchdog_child).
warnings.filterwarnings('ignore', message=r'.*use of fork\(\) may lead to deadlocks',
                        category=DeprecationWarning)


class ToolstackError(Exception):
    """A toolstack command could not run, hung, or failed; the message names it."""

    def __init__(self, argv, problem, output=''):
        output = output.strip()
        Exception.__init__(self, '`%s` %s%s' % (' '.join(argv), problem,
                                                ': ' + output if output else ''))


def find_toolstack(configured=''):
    """The Xen toolstack to run: `configured` when it is executable, else xl, then xm, from
    PATH. None when there is none."""
    if configured:
        usable = os.path.isfile(configured) and os.access(configured, os.X_OK)
        return configured if usable else None
    for name in TOOLSTACK_NAMES:
        for folder in os.environ.get('PATH', os.defpath).split(os.pathsep):
            path = os.path.join(folder or os.curdir, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return os.path.abspath(path)
    return None


def run_command(argv, timeout):
    """Run argv without a shell -> (exit status, output text, stdout and stderr together).
    Raises ToolstackError when it cannot start or does not finish within `timeout` (killed)."""
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        process = subprocess.Popen(argv, stdin=null, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, close_fds=True)
    except (IOError, OSError) as exc:
        raise ToolstackError(argv, 'cannot be run (%s)' % (exc.strerror or exc))
    finally:
        os.close(null)
    deadline = time.time() + timeout
    output = []
    kept = 0
    poller = select.poll()
    poller.register(process.stdout.fileno(), select.POLLIN)
    try:
        while True:
            # Past the deadline, a command that has exited is not killed: the time may have
            # passed while this process was not running (a loaded or stopped host).
            remaining = deadline - time.time()
            if remaining <= 0 and process.poll() is None:
                process.kill()
                process.wait()
                raise ToolstackError(argv, 'did not finish within %.1fs (killed)' % timeout,
                                     _command_text(output))
            try:
                events = poller.poll(max(0, int(remaining * 1000) + 1))
            except (select.error, IOError, OSError) as exc:
                if exc.args and exc.args[0] == errno.EINTR:
                    continue
                raise
            if not events:
                if remaining <= 0:  # it exited; whatever still holds its output is not it
                    break
                continue
            data = os.read(process.stdout.fileno(), 65536)
            if not data:
                break
            if kept < TOOLSTACK_OUTPUT_LIMIT:
                output.append(data)
                kept += len(data)
        while process.poll() is None:
            if time.time() > deadline and process.poll() is None:
                process.kill()
                process.wait()
                raise ToolstackError(argv, 'did not exit within %.1fs (killed)' % timeout,
                                     _command_text(output))
            time.sleep(0.001)
    finally:
        process.stdout.close()
    return process.returncode, _command_text(output)


def xen_domain_state(list_output, domain):
    """The State column ('r-----', '--p---', ...) of `domain` in `xl list` / `xm list`
    output, or '' when it is not there."""
    for line in list_output.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and fields[0] == domain:
            return fields[4]
    return ''


def xen_domain_absent(status, output):
    """True when a `list NAME` exit status and output say positively that no such domain
    exists on this server (not a toolstack that failed for another reason)."""
    return status != 0 and bool(NO_SUCH_DOMAIN_RE.search(output))


def _command_text(chunks):
    return b''.join(chunks)[:TOOLSTACK_OUTPUT_LIMIT].decode('utf-8', 'replace')


def _watchdog_child(read_fd, deadline, argv, fd_limit):
    """The forked watchdog: wait for EOF on read_fd or the deadline, then run argv (unpause).
    Uses only os-level calls (no locks, logging or imports: other threads held those at fork
    time) and leaves with os._exit, never through the server's code. Whatever fails before,
    the unpause is still tried."""
    status = WATCHDOG_CRASHED | WATCHDOG_UNPAUSE_FAILED
    try:
        overran = False
        try:
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(number, signal.SIG_IGN)  # a process group signal must not stop it
            os.closerange(3, read_fd)  # the server's sockets, database and other pipes
            os.closerange(read_fd + 1, fd_limit)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)  # for the toolstack: the exporter's stdout may be its log
            os.close(null)
            overran = _watchdog_wait(read_fd, deadline)
        except Exception:
            overran = True  # unpaused at once: the snapshot may not count as one instant
        unpaused = False
        for _ in range(WATCHDOG_UNPAUSE_ATTEMPTS):
            if _watchdog_run(argv):
                unpaused = True
                break
        status = ((WATCHDOG_OVERRAN if overran else 0) |
                  (0 if unpaused else WATCHDOG_UNPAUSE_FAILED))
    finally:
        os._exit(status)


def _watchdog_wait(read_fd, deadline):
    """Wait for EOF (or anything) on read_fd -> False, or for the deadline (or an error:
    the unpause then comes early) -> True."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            return True
        try:
            if poller.poll(int(remaining * 1000) + 1):
                return False
        except (select.error, IOError, OSError) as exc:
            if not exc.args or exc.args[0] != errno.EINTR:
                return True


def _watchdog_run(argv):
    """Run argv from the watchdog (fork + exec, killed after TOOLSTACK_TIMEOUT) -> success."""
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        stop_at = time.time() + TOOLSTACK_TIMEOUT
        while True:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                return code == 0
            if time.time() > stop_at:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return False
            time.sleep(0.001)
    except OSError:
        return False


class DomainPause(object):
    """One pause of a Xen domain: arm() forks the watchdog, pause() pauses (raises
    ToolstackError), release() has the watchdog unpause and waits for it. After release():
    `unpaused` (the unpause command succeeded), `overran` (the watchdog's deadline came first),
    `paused_ms` (pause end to unpause end, when pause() succeeded), `killed` (the watchdog
    outlived its deadline and unpause tries: killed, nothing unpaused)."""

    def __init__(self, toolstack, domain, max_seconds):
        self.toolstack, self.domain, self.max_seconds = toolstack, domain, max_seconds
        self.pid = self.write_fd = self.paused_at = self.paused_ms = None
        self.unpaused = self.overran = self.killed = False

    def arm(self):
        self.deadline = time.time() + self.max_seconds
        try:
            fd_limit = os.sysconf('SC_OPEN_MAX')
        except (ValueError, OSError):
            fd_limit = 65536
        argv = [self.toolstack, 'unpause', self.domain]
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:
            _watchdog_child(read_fd, self.deadline, argv, max(fd_limit, read_fd + 1))
        os.close(read_fd)
        self.pid, self.write_fd = pid, write_fd

    def pause(self):
        argv = [self.toolstack, 'pause', self.domain]
        remaining = self.deadline - time.time()
        if remaining <= 0:
            raise ToolstackError(argv, 'not run: snapshot_pause_max had already passed')
        status, output = run_command(argv, remaining)
        if status != 0:
            raise ToolstackError(argv, 'failed with exit status %d' % status, output)
        self.paused_at = time.time()

    def release(self):
        if self.pid is None:
            return
        os.close(self.write_fd)
        pid, self.pid = self.pid, None
        give_up_at = (self.deadline + WATCHDOG_UNPAUSE_ATTEMPTS * TOOLSTACK_TIMEOUT +
                      WATCHDOG_REAP_MARGIN)
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
                continue
            if done:
                break
            if time.time() > give_up_at:
                self._kill(pid)
                status = None
                break
            time.sleep(0.001)
        if status is None:
            code = WATCHDOG_OVERRAN | WATCHDOG_UNPAUSE_FAILED
        else:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else WATCHDOG_CRASHED
        if code & WATCHDOG_CRASHED:
            code |= WATCHDOG_UNPAUSE_FAILED
        self.unpaused = not code & WATCHDOG_UNPAUSE_FAILED
        self.overran = bool(code & WATCHDOG_OVERRAN)
        if self.paused_at is not None:
            self.paused_ms = int(math.ceil((time.time() - self.paused_at) * 1000))

    def _kill(self, pid):
        """The watchdog hangs past its deadline and every unpause try: SIGKILL and reap it."""
        self.killed = True
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        while True:
            try:
                os.waitpid(pid, 0)
                return
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    return


# ------------------------------------------------------------------------ snapshot store ---
#
# SQLite holds what snapshots exist; the snapshot files themselves are the truth about data.
# A snapshot's life: a 'creating' record is written before anything touches the filesystem,
# then every disk is cloned, then the record becomes 'ready'. Deleting marks 'deleting',
# removes the files, then the record. reconcile() at start-up finishes or undoes whatever a
# crash interrupted, so a kill -9 at any moment leaves nothing behind after the next start.

SNAPSHOTS_DIR_NAME = 'CoriolisSnapshots'
# Written into every snapshot folder this exporter makes. OVM repositories are shared by all the
# servers of a pool, each with its own exporter: start-up clean-up only touches folders whose
# owner file holds this store's instance id.
SNAPSHOT_OWNER_FILE = '.ovm-exporter-owner'
PROBE_FILE_MAX_AGE = 600.0
SCHEMA_VERSION = 1
SQLITE_MAGIC = b'SQLite format 3\x00'
UUID_RE = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$')

STORE_SCHEMA = [
    'CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)',
    'CREATE TABLE IF NOT EXISTS snapshots ('
    ' seq INTEGER PRIMARY KEY AUTOINCREMENT,'
    ' id TEXT NOT NULL UNIQUE,'
    ' vm_id TEXT NOT NULL,'
    ' state TEXT NOT NULL,'
    ' created REAL NOT NULL)',
    'CREATE INDEX IF NOT EXISTS snapshots_vm ON snapshots (vm_id, seq)',
    'CREATE TABLE IF NOT EXISTS snapshot_disks ('
    ' snapshot_id TEXT NOT NULL,'
    ' position INTEGER NOT NULL,'
    ' name TEXT NOT NULL,'
    ' parent_path TEXT NOT NULL,'
    ' path TEXT NOT NULL,'
    ' repo_mountpoint TEXT NOT NULL,'
    ' size INTEGER,'
    ' data_bytes INTEGER,'
    ' extent_count INTEGER,'
    ' clone_method TEXT,'
    ' PRIMARY KEY (snapshot_id, name))',
    # domains this exporter paused and has not yet seen unpaused (see DomainPause)
    'CREATE TABLE IF NOT EXISTS paused_domains ('
    ' vm_id TEXT PRIMARY KEY,'
    ' toolstack TEXT NOT NULL,'
    ' since REAL NOT NULL)',
]
# Columns added after schema version 1 was released: added to older databases when they are
# opened (ALTER TABLE ADD COLUMN, SQLite 3.2+); an older exporter ignores them.
STORE_ADDED_COLUMNS = [
    ('snapshots', 'consistency', 'TEXT'),
    ('snapshots', 'paused_ms', 'INTEGER'),
]
SNAPSHOT_COLUMNS = 'seq, id, vm_id, state, created, consistency, paused_ms'


class StoreError(Exception):
    """The state database failed; the message names its file."""


class StoreBusyError(StoreError):
    """Another process held the state database's lock for STORE_BUSY_TIMEOUT seconds."""


class StoreFullError(StoreError):
    """The filesystem of the state database is full."""


# How long one store call waits for another process's lock before it gives up with StoreBusyError.
# The store retries itself instead of using SQLite's busy handler, which would wait while holding
# the store's lock: requests queued behind it would each wait that long again.
STORE_BUSY_TIMEOUT = 5.0
# Next to the database: its instance id, so that a lost database's successor knows the snapshot
# folders it made (owner files) and can remove them as orphans.
STORE_INSTANCE_FILE_SUFFIX = '.instance-id'
_INSTANCE_ID_RE = re.compile(r'^[0-9a-f]{32}$')


class SnapshotStore(object):
    """Snapshot records in SQLite, safe to call from many threads.

    Every failure of the database is raised as StoreError (StoreBusyError, StoreFullError)
    naming the file.
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.RLock()
        self.generation = 0  # counts writes: what readers cached from before is stale
        self.check_is_sqlite(path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, 0o700)
        try:
            self._db = sqlite3.connect(path, timeout=0, check_same_thread=False,
                                       isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError('cannot open state database %s: %s' % (path, exc))
        try:
            self._attempt(self._setup)
        except StoreError:
            self._db.close()
            raise
        self._identity = self._file_identity()
        self._keep_instance_file()

    @staticmethod
    def check_is_sqlite(path):
        try:
            with open(path, 'rb') as handle:
                head = handle.read(len(SQLITE_MAGIC))
        except (IOError, OSError) as exc:
            if exc.errno == errno.ENOENT:
                return
            raise StoreError('cannot read state database %s: %s' % (path, exc.strerror))
        if head and head != SQLITE_MAGIC:
            raise StoreError(
                '%s is not an SQLite database (the Go service kept a BoltDB file here?). '
                'It was left untouched; point db_file at a new path.' % path)

    def _setup(self):
        # A rollback journal, never WAL: WAL maps its -shm file into memory, and when that file
        # cannot be written (chattr +i) the next write to the mapping kills the process with
        # SIGBUS. This also turns a WAL database of an older version back; SQLite 3.6 has none.
        self._db.execute('PRAGMA journal_mode=DELETE')
        self._db.execute('PRAGMA synchronous=FULL')
        self._db.execute('BEGIN IMMEDIATE')
        try:
            for statement in STORE_SCHEMA:
                self._db.execute(statement)
            for table, column, kind in STORE_ADDED_COLUMNS:
                present = [r[1] for r in self._db.execute('PRAGMA table_info(%s)' % table)]
                if column not in present:
                    self._db.execute('ALTER TABLE %s ADD COLUMN %s %s' % (table, column, kind))
            row = self._db.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                                 (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError('%s has schema version %s, newer than this program (%d)'
                                 % (self.path, row[0], SCHEMA_VERSION))
            row = self._db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta (key, value) VALUES ('instance_id', ?)",
                                 (self._previous_instance_id() or uuid.uuid4().hex,))
            # Who made a snapshot folder: repositories are shared by every server of a pool.
            self.instance_id = self._db.execute(
                "SELECT value FROM meta WHERE key = 'instance_id'").fetchone()[0]
            self._db.execute('COMMIT')
        except BaseException:
            self._rollback_quietly()
            raise

    @property
    def instance_file(self):
        return self.path + STORE_INSTANCE_FILE_SUFFIX

    def _previous_instance_id(self):
        """The id kept beside a database that was lost: its snapshot folders are ours."""
        try:
            with open(self.instance_file) as handle:
                text = handle.read(100).strip()
        except (IOError, OSError):
            return None
        if not _INSTANCE_ID_RE.match(text):
            log.warning('ignoring %s: it does not hold an instance id', self.instance_file)
            return None
        log.warning('state database %s is new; it keeps the instance id of the one before it '
                    '(%s), so that folders made before and no longer recorded are removed',
                    self.path, self.instance_file)
        return text

    def _keep_instance_file(self):
        try:
            with open(self.instance_file) as handle:
                if handle.read(100).strip() == self.instance_id:
                    return
        except (IOError, OSError):
            pass
        try:
            _auth_write_file_atomically(self.instance_file,
                                        (self.instance_id + '\n').encode('ascii'))
        except (IOError, OSError) as exc:
            log.warning('cannot write %s: %s; if the state database is lost, its snapshot '
                        'folders must be removed by hand', self.instance_file, exc)

    def _file_identity(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _error(self, exc):
        """sqlite3's exception -> StoreError naming the file (sqlite3 on 2.6 has no codes)."""
        text = str(exc)
        if 'locked' in text or 'busy' in text:
            return StoreBusyError('state database %s is locked by another process (waited %gs): '
                                  '%s' % (self.path, STORE_BUSY_TIMEOUT, text))
        if 'full' in text:
            return StoreFullError('state database %s: its filesystem is full: %s'
                                  % (self.path, text))
        if 'not a database' in text or 'malformed' in text:
            return StoreError('state database %s is damaged (%s); see "When the host '
                              'misbehaves" in the README' % (self.path, text))
        # SQLite names no errno ("unable to open database file", "disk I/O error"): try a file
        # beside the database to tell a read-only or full filesystem from a failing file.
        try:
            fd, probe = tempfile.mkstemp(prefix='.ovm-exporter-db-probe-',
                                         dir=os.path.dirname(os.path.abspath(self.path)))
            os.close(fd)
            os.unlink(probe)
        except (IOError, OSError) as probe_error:
            if probe_error.errno == errno.EROFS:
                return StoreError('state database %s is on a read-only filesystem: %s'
                                  % (self.path, text))
            if probe_error.errno in (errno.ENOSPC, errno.EDQUOT):
                return StoreFullError('state database %s: its filesystem is full: %s'
                                      % (self.path, text))
        return StoreError('state database %s failed: %s' % (self.path, text))

    def _rollback_quietly(self):
        try:
            self._db.execute('ROLLBACK')
        except sqlite3.Error:
            pass  # no transaction left, or the file itself failed: the error before says why

    def _attempt(self, work):
        """work() under the lock; retried while another process holds the database locked."""
        deadline = time.time() + STORE_BUSY_TIMEOUT
        pause = 0.005
        while True:
            with self._lock:
                try:
                    return work()
                except sqlite3.Error as exc:
                    error = self._error(exc)
            if not isinstance(error, StoreBusyError) or time.time() >= deadline:
                raise error
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _write(self, statements):
        self.generation += 1  # before and after: a reader that overlaps it sees a change
        try:
            self._write_now(statements)
        finally:
            self.generation += 1

    def _write_now(self, statements):
        def transaction():
            if self._file_identity() != self._identity:
                raise StoreError('state database %s was deleted or replaced while running; '
                                 'nothing more is written to it. Restart the exporter (see '
                                 '"When the host misbehaves" in the README)' % self.path)
            self._db.execute('BEGIN IMMEDIATE')
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute('COMMIT')
            except BaseException:
                self._rollback_quietly()
                raise
        self._attempt(transaction)

    def _query(self, sql, args=()):
        return self._attempt(lambda: self._db.execute(sql, args).fetchall())

    def close(self):
        with self._lock:
            self._db.close()

    # -- writes
    def record_intent(self, snapshot_id, vm_id, disks):
        """disks: dicts with name, parent_path, path, repo_mountpoint."""
        statements = [('INSERT INTO snapshots (id, vm_id, state, created) VALUES (?, ?, ?, ?)',
                       (snapshot_id, vm_id, 'creating', time.time()))]
        for position, disk in enumerate(disks):
            statements.append((
                'INSERT INTO snapshot_disks (snapshot_id, position, name, parent_path, path,'
                ' repo_mountpoint) VALUES (?, ?, ?, ?, ?, ?)',
                (snapshot_id, position, disk['name'], disk['parent_path'], disk['path'],
                 disk['repo_mountpoint'])))
        self._write(statements)

    def mark_ready(self, snapshot_id, disk_facts, consistency=None, paused_ms=None):
        """disk_facts: name -> (size, data_bytes, extent_count, clone_method)."""
        statements = []
        for name, facts in disk_facts.items():
            statements.append((
                'UPDATE snapshot_disks SET size = ?, data_bytes = ?, extent_count = ?,'
                ' clone_method = ? WHERE snapshot_id = ? AND name = ?',
                tuple(facts) + (snapshot_id, name)))
        statements.append(("UPDATE snapshots SET state = 'ready', consistency = ?, paused_ms = ?"
                           " WHERE id = ?", (consistency, paused_ms, snapshot_id)))
        self._write(statements)

    def mark_deleting(self, snapshot_id):
        self._write([("UPDATE snapshots SET state = 'deleting' WHERE id = ?", (snapshot_id,))])

    def forget(self, snapshot_id):
        self._write([('DELETE FROM snapshot_disks WHERE snapshot_id = ?', (snapshot_id,)),
                     ('DELETE FROM snapshots WHERE id = ?', (snapshot_id,))])

    def record_pause(self, vm_id, toolstack):
        self._write([('INSERT OR REPLACE INTO paused_domains (vm_id, toolstack, since)'
                      ' VALUES (?, ?, ?)', (vm_id, toolstack, time.time()))])

    def forget_pause(self, vm_id):
        self._write([('DELETE FROM paused_domains WHERE vm_id = ?', (vm_id,))])

    def paused_domains(self):
        """[(vm_id, toolstack)] recorded as paused by this exporter."""
        return [tuple(r) for r in self._query(
            'SELECT vm_id, toolstack FROM paused_domains ORDER BY since')]

    # -- reads
    def _snapshot_from_row(self, row):
        seq, snapshot_id, vm_id, state, created, consistency, paused_ms = row
        disks = []
        for d in self._db.execute(
                'SELECT name, parent_path, path, repo_mountpoint, size, data_bytes,'
                ' extent_count, clone_method FROM snapshot_disks WHERE snapshot_id = ?'
                ' ORDER BY position', (snapshot_id,)).fetchall():
            disks.append({'name': d[0], 'parent_path': d[1], 'path': d[2],
                          'repo_mountpoint': d[3], 'size': d[4], 'data_bytes': d[5],
                          'extent_count': d[6], 'clone_method': d[7]})
        return {'seq': seq, 'id': snapshot_id, 'vm_id': vm_id, 'state': state,
                'created': created, 'disks': disks, 'consistency': consistency,
                'paused_ms': paused_ms}

    def _snapshots(self, where='', args=()):
        """Records with their disks, read in one go: no write of ours comes in between."""
        def read():
            rows = self._db.execute('SELECT %s FROM snapshots%s ORDER BY seq'
                                    % (SNAPSHOT_COLUMNS, where), args).fetchall()
            return [self._snapshot_from_row(r) for r in rows]
        return self._attempt(read)

    def get(self, snapshot_id):
        records = self._snapshots(' WHERE id = ?', (snapshot_id,))
        return records[0] if records else None

    def list_for_vm(self, vm_id, states=('ready',)):
        return [r for r in self._snapshots(' WHERE vm_id = ?', (vm_id,)) if r['state'] in states]

    def list_all(self):
        return self._snapshots()

    def ready_ids_by_vm(self):
        result = {}
        for vm_id, snapshot_id in self._query(
                "SELECT vm_id, id FROM snapshots WHERE state = 'ready' ORDER BY seq"):
            result.setdefault(vm_id, []).append(snapshot_id)
        return result

    def repo_mountpoints(self):
        return [r[0] for r in self._query('SELECT DISTINCT repo_mountpoint FROM snapshot_disks')]


# -------------------------------------------------------------------- snapshot service ---

class ServiceError(Exception):
    """What the service (or the authenticator) refuses or fails to do, in its own words; the
    HTTP section maps each kind to a status and title (ERROR_STATUSES). `headers`: what a
    client needs to retry (Retry-After, Content-Range).
    Names: a ServiceError subclass is named for the condition (NotFound, NoSpace); every other
    exception class ends in Error (ConfigError, StoreBusyError, CloneError, ApiError, ...)."""

    def __init__(self, details, headers=None):
        Exception.__init__(self, details)
        self.details = details
        self.headers = headers or {}


class NotFound(ServiceError):
    """No such virtual machine, snapshot, disk or snapshot file."""


class InvalidRequest(ServiceError):
    """Arguments the service cannot use, e.g. a VM that is not snapshot compatible."""


class WrongVm(ServiceError):
    """A snapshot named under a virtual machine it does not belong to."""


class RangeNotSatisfiable(ServiceError):
    """A byte range outside the disk."""


class NoSpace(ServiceError):
    """A repository too full to take (more) snapshot files."""


class RepositoryUnavailable(ServiceError):
    """A repository that holds (or would hold) snapshot files is not mounted now."""


class ServiceFailure(ServiceError):
    """Anything else that failed on the host (I/O, the toolstack, a pause that must happen)."""


def remove_tree_quietly(path):
    """Remove a snapshot folder; return True when nothing is left."""
    if not os.path.lexists(path):
        return True
    try:
        shutil.rmtree(path)
        return True
    except (IOError, OSError) as exc:
        log.error('cannot remove %s: %s', path, exc)
        return False


def copy_sparse(src, dst):
    """Copy data regions only (demo fallback where the folder's filesystem cannot clone)."""
    seek_data, seek_hole = getattr(os, 'SEEK_DATA', 3), getattr(os, 'SEEK_HOLE', 4)
    src_fd = open_regular_file(src)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = os.fstat(src_fd).st_size
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(src_fd, offset, seek_data)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    raise
                end = os.lseek(src_fd, start, seek_hole)
                os.lseek(src_fd, start, os.SEEK_SET)
                os.lseek(dst_fd, start, os.SEEK_SET)
                remaining = end - start
                while remaining:
                    block = os.read(src_fd, min(remaining, 1 << 20))
                    if not block:
                        break
                    os.write(dst_fd, block)
                    remaining -= len(block)
                offset = end
            os.ftruncate(dst_fd, size)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return 'sparse_copy'


class SnapshotFolders(object):
    """The snapshot files on disk: <repository>/CoriolisSnapshots/<snapshot id>/<disk name>,
    each folder with an owner file holding `owner` (the store's instance id: repositories are
    shared by the servers of a pool, and start-up removes only its own orphans); their free
    space, and how a disk gets into one (a clone; a sparse copy in the demo)."""

    def __init__(self, owner, min_free_percent=0, demo=False):
        self.owner = owner
        self.min_free_percent = min_free_percent
        self.demo = demo

    @staticmethod
    def base(mountpoint):
        return os.path.join(mountpoint, SNAPSHOTS_DIR_NAME)

    @classmethod
    def folder(cls, mountpoint, snapshot_id):
        return os.path.join(cls.base(mountpoint), snapshot_id)

    def make(self, folder):
        if not os.path.isdir(folder):
            os.makedirs(folder, 0o700)
            with open(os.path.join(folder, SNAPSHOT_OWNER_FILE), 'w') as owner:
                owner.write(self.owner + '\n')

    def remove(self, snapshot_id, mountpoints):
        """Remove the snapshot's folder from every repository; True when nothing is left."""
        clean = True
        for mountpoint in sorted(set(mountpoints)):
            clean = remove_tree_quietly(self.folder(mountpoint, snapshot_id)) and clean
        return clean

    def check_free_space(self, mountpoints):
        minimum = self.min_free_percent
        for mountpoint in mountpoints:
            try:
                st = os.statvfs(mountpoint)
            except OSError as exc:
                raise ServiceFailure('cannot read free space of %s: %s'
                                     % (mountpoint, exc.strerror))
            if st.f_blocks and 100.0 * st.f_bavail / st.f_blocks < minimum:
                raise NoSpace('repository %s has less than %d%% free space; snapshots pin '
                              'blocks and a full repository stops its VMs'
                              % (mountpoint, minimum))

    def copy(self, source, target):
        try:
            return clone_file(source, target)
        except CloneError as exc:
            if self.demo and exc.cannot_clone:
                return copy_sparse(source, target)
            raise

    def made_here(self, folder):
        """True when `folder` is a snapshot folder made by this exporter (its owner file)."""
        if os.path.islink(folder) or not os.path.isdir(folder):
            return False
        try:  # a pool peer's FIFO must not block the start-up
            with os.fdopen(open_regular_file(os.path.join(folder, SNAPSHOT_OWNER_FILE))) as owner:
                return owner.read(100).strip() == self.owner
        except (IOError, OSError):
            return False

    def sweep(self, mountpoint, owned):
        """Remove the orphan folders (ids not in `owned`) this exporter made in a repository,
        and the probe files a crash left there. Returns how many folders went."""
        base = self.base(mountpoint)
        try:
            names = os.listdir(base)
        except OSError:
            return 0
        removed = 0
        for name in names:
            path = os.path.join(base, name)
            if UUID_RE.match(name) and name not in owned and self.made_here(path):
                log.warning('removing orphan snapshot folder %s', path)
                if remove_tree_quietly(path):
                    removed += 1
            elif name.startswith(_CLONE_PROBE_PREFIX):
                try:  # left by a crash in the middle of a probe: ours, or a pool peer's
                    if name.startswith(_CLONE_PROBE_HOST_PREFIX) or \
                            os.lstat(path).st_mtime < time.time() - PROBE_FILE_MAX_AGE:
                        os.unlink(path)
                except OSError:
                    pass
        return removed


def _is_missing(path):
    """True only when `path` provably does not exist (not for any other error)."""
    try:
        os.lstat(path)
        return False
    except OSError as exc:
        return exc.errno in (errno.ENOENT, errno.ENOTDIR)


class KeyedLocks(object):
    """One lock per key (a VM id), created on demand."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks = {}

    def get(self, key):
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock


class DomainCut(object):
    """How the disks of a snapshot are cut (config.snapshot_pause): one by one, or all while
    the VM's Xen domain is paused, the pause recorded in the store until the domain is seen
    unpaused."""

    def __init__(self, config, store):
        self.config = config
        self.store = store

    def plan(self, vm_id, disk_count):
        """-> (toolstack to pause the domain with, None) or (None, consistency)."""
        mode = self.config.snapshot_pause
        if mode == 'never':
            return None, 'per-disk'
        toolstack = find_toolstack(self.config.xen_toolstack)
        if toolstack is None:
            problem = ('no Xen toolstack: %s is not an executable file' % self.config.xen_toolstack
                       if self.config.xen_toolstack else 'no Xen toolstack (xl or xm) on PATH')
            if mode == 'always':
                raise ServiceFailure('snapshot_pause is "always" but there is %s' % problem)
            log.debug('snapshot of %s: %s; disks are cut one by one', vm_id, problem)
            return None, 'per-disk'
        try:
            status, output = run_command([toolstack, 'list', vm_id], TOOLSTACK_TIMEOUT)
            if xen_domain_absent(status, output):
                return None, 'stopped'
            if status != 0:
                raise ToolstackError([toolstack, 'list', vm_id],
                                     'failed with exit status %d' % status, output)
        except ToolstackError as exc:
            if mode == 'always':
                raise ServiceFailure('cannot tell whether domain %s runs: %s' % (vm_id, exc))
            log.warning('snapshot of %s: cannot tell whether its domain runs (%s); disks are '
                        'cut one by one', vm_id, exc)
            return None, 'per-disk'
        if 'p' in xen_domain_state(output, vm_id):
            # Paused by someone else: nothing runs, and our unpause would end their pause.
            log.info('snapshot of %s: its domain is already paused; left as it is', vm_id)
            return None, 'stopped'
        if mode == 'auto' and disk_count < 2:
            return None, 'per-disk'
        return toolstack, None

    def clone_paused(self, snapshot_id, vm_id, disks, toolstack, clone_each):
        """Clone every disk while the domain is paused -> (methods, consistency, paused_ms).
        In 'auto', a pause that fails or overruns snapshot_pause_max gives 'per-disk'."""
        always = self.config.snapshot_pause == 'always'
        pause = DomainPause(toolstack, vm_id, self.config.snapshot_pause_max)
        self.store.record_pause(vm_id, toolstack)
        try:
            pause.arm()
        except BaseException:
            self.store.forget_pause(vm_id)
            raise
        try:
            pause.pause()
        except BaseException as exc:
            self._release(pause, vm_id, expect_paused=False)
            if not isinstance(exc, ToolstackError):
                raise
            if always:
                raise ServiceFailure('cannot pause domain %s: %s' % (vm_id, exc))
            log.warning('snapshot %s: cannot pause domain %s (%s); disks are cut one by one',
                        snapshot_id, vm_id, exc)
            return clone_each(snapshot_id, disks), 'per-disk', None
        try:
            methods = clone_each(snapshot_id, disks)
        finally:
            self._release(pause, vm_id, expect_paused=True)
        log.info('snapshot %s: domain %s was paused for %d ms while %d disks were cloned',
                 snapshot_id, vm_id, pause.paused_ms, len(disks))
        if pause.overran:
            message = ('domain %s stayed paused longer than snapshot_pause_max (%gs): the '
                       'watchdog unpaused it before every disk was cloned'
                       % (vm_id, self.config.snapshot_pause_max))
            if always:
                raise ServiceFailure(message)
            log.warning('snapshot %s: %s; it counts as cut one by one', snapshot_id, message)
            return methods, 'per-disk', None
        return methods, 'paused', pause.paused_ms

    def _release(self, pause, vm_id, expect_paused):
        pause.release()
        if pause.killed:
            log.error('the pause watchdog of domain %s still ran %gs after snapshot_pause_max '
                      'and its unpause tries: killed; the exporter unpauses the domain itself',
                      vm_id, WATCHDOG_UNPAUSE_ATTEMPTS * TOOLSTACK_TIMEOUT + WATCHDOG_REAP_MARGIN)
        if pause.killed or pause.overran or not expect_paused:
            # The pause may have landed after the watchdog's unpause (a timed-out, killed
            # `xl pause`, or a watchdog that unpaused at once): ask the toolstack.
            unpaused = self._unpause_if_paused(pause.toolstack, vm_id)
        else:
            unpaused = pause.unpaused
        if unpaused:
            self.store.forget_pause(vm_id)
        else:
            log.error('could not unpause domain %s with %s unpause; unpause it by hand; the '
                      'next start of the exporter tries again', vm_id, pause.toolstack)

    def _unpause_if_paused(self, toolstack, vm_id):
        """Unpause the domain when `list` shows it paused -> True once it is seen not paused."""
        for attempt in range(WATCHDOG_UNPAUSE_ATTEMPTS + 1):
            try:
                status, output = run_command([toolstack, 'list', vm_id], TOOLSTACK_TIMEOUT)
            except ToolstackError as exc:
                log.error('cannot tell whether domain %s is still paused: %s', vm_id, exc)
                return False
            if xen_domain_absent(status, output):
                return True
            if status != 0:
                log.error('cannot tell whether domain %s is still paused: `%s list` says: %s',
                          vm_id, toolstack, output.strip() or 'exit status %d' % status)
                return False
            if 'p' not in xen_domain_state(output, vm_id):
                return True
            if attempt == WATCHDOG_UNPAUSE_ATTEMPTS:
                return False
            log.warning('domain %s was still paused after the watchdog unpaused it: unpausing '
                        'it again', vm_id)
            try:
                status, output = run_command([toolstack, 'unpause', vm_id], TOOLSTACK_TIMEOUT)
            except ToolstackError as exc:
                log.error('domain %s is still paused: %s', vm_id, exc)
                continue
            if status != 0:
                log.error('domain %s is still paused: `%s unpause` says: %s', vm_id, toolstack,
                          output.strip() or 'exit status %d' % status)
        return False

    def unpause_leftovers(self):
        """At start-up: unpause the domains a killed exporter may have left paused."""
        for vm_id, toolstack in self.store.paused_domains():
            toolstack = find_toolstack(toolstack) or find_toolstack(self.config.xen_toolstack)
            if toolstack is None:
                log.error('domain %s may have been left paused, and no Xen toolstack is found '
                          'to unpause it', vm_id)
                continue
            try:
                status, output = run_command([toolstack, 'unpause', vm_id], TOOLSTACK_TIMEOUT)
            except ToolstackError as exc:
                log.error('domain %s may have been left paused: %s', vm_id, exc)
                continue
            if status == 0:
                log.warning('domain %s was left paused by an interrupted snapshot: unpaused',
                            vm_id)
            else:
                log.info('domain %s was recorded as paused; `%s unpause` says: %s', vm_id,
                         toolstack, output.strip() or 'exit status %d' % status)
            self.store.forget_pause(vm_id)


class SnapshotService(object):
    """What the API does: VMs from discovery, snapshots in the store and on the filesystem."""

    def __init__(self, config, inventory, store):
        self.folders = SnapshotFolders(store.instance_id, config.snapshot_min_free_percent,
                                       config.demo)
        self.config = config
        self.inventory = inventory
        self.store = store
        self.vm_locks = KeyedLocks()
        self.cut = DomainCut(config, store)
        # Ready snapshots by id, for the disk route: SQLite stays the truth, and any write to
        # it (create, delete, reconcile) empties this index.
        self._ready = {}
        self._ready_generation = None

    # -- virtual machines
    def _snapshot_ids(self, read, problems):
        """VM listings come from the filesystem: a failed state database leaves out only the
        snapshot ids (an empty list) and says why in `problems`."""
        try:
            return read()
        except StoreError as exc:
            log.error('listing virtual machines without their snapshots: %s', exc)
            if problems is not None:
                problems.append(str(exc))
            return None

    def list_vms(self, problems=None):
        snapshot_ids = self._snapshot_ids(self.store.ready_ids_by_vm, problems) or {}
        result = []
        for vm in self.inventory.list_vms():
            view = vm.to_json()
            view['snapshots'] = snapshot_ids.get(vm.name, [])
            result.append(view)
        return result

    def _vm_or_404(self, vm_id):
        vm = self.inventory.get_vm(vm_id)
        if vm is None:
            raise NotFound('virtual machine %s not found on this host' % vm_id)
        return vm

    def get_vm(self, vm_id, problems=None):
        view = self._vm_or_404(vm_id).to_json()
        records = self._snapshot_ids(lambda: self.store.list_for_vm(vm_id), problems)
        view['snapshots'] = [s['id'] for s in records or []]
        return view

    # -- snapshots
    def _snapshot_or_404(self, vm_id, snapshot_id, what='snapshot'):
        record = self.store.get(snapshot_id) if UUID_RE.match(snapshot_id) else None
        if record is None or record['state'] != 'ready':
            raise NotFound('%s %s not found' % (what, snapshot_id))
        if record['vm_id'] != vm_id:
            raise WrongVm('%s %s belongs to virtual machine %s, not %s'
                          % (what, snapshot_id, record['vm_id'], vm_id))
        return record

    def create_snapshot(self, vm_id):
        vm = self._vm_or_404(vm_id)
        if not vm.snapshot_compatible:
            raise InvalidRequest('virtual machine %s is not snapshot compatible: %s' % (
                vm_id, vm.compat_reason or 'it has no data disks'))
        snapshot_id = str(uuid.uuid4())
        disks = []
        for disk in vm.disks:
            if disk.kind == 'cdrom':
                continue
            mountpoint = disk.repo_mountpoint
            disks.append({'name': disk.name, 'parent_path': disk.path,
                          'repo_mountpoint': mountpoint,
                          'path': os.path.join(self.folders.folder(mountpoint, snapshot_id),
                                               disk.name)})
        with self.vm_locks.get(vm_id):
            mountpoints = sorted(set(d['repo_mountpoint'] for d in disks))
            self._check_mounted(mountpoints, 'no snapshot was made')
            for disk in disks:
                real, why = disk_file_problem(disk['parent_path'], disk['repo_mountpoint'])
                if why:
                    raise InvalidRequest('virtual machine %s is not snapshot compatible: disk '
                                         '%s: %s' % (vm_id, disk['parent_path'], why))
                disk['source'] = real
            self.folders.check_free_space(mountpoints)
            toolstack, consistency = self.cut.plan(vm_id, len(disks))
            self.store.record_intent(snapshot_id, vm_id, disks)
            try:
                for disk in disks:
                    self.folders.make(os.path.dirname(disk['path']))
                paused_ms = None
                if toolstack is None:
                    methods = self._clone_each(snapshot_id, disks)
                else:
                    methods, consistency, paused_ms = self.cut.clone_paused(
                        snapshot_id, vm_id, disks, toolstack, self._clone_each)
                facts = {}
                views = []
                for disk in disks:
                    extents, size = file_extents(disk['path'])
                    chunks = data_chunks(extents, size)
                    facts[disk['name']] = (size, sum(c['length'] for c in chunks),
                                           len(chunks), methods[disk['name']])
                    views.append(self._disk_view(snapshot_id, disk, chunks))
                self.store.mark_ready(snapshot_id, facts, consistency, paused_ms)
            except BaseException as exc:
                self.undo_create(snapshot_id, disks)
                raise self._clone_failure(exc)
        return self._cut_fields({'id': snapshot_id, 'vm_id': vm_id, 'disks': views},
                                consistency, paused_ms)

    @staticmethod
    def _cut_fields(view, consistency, paused_ms):
        view['consistency'] = consistency or 'per-disk'  # older records: cut one by one
        if consistency == 'paused' and paused_ms is not None:
            view['paused_ms'] = paused_ms
        return view

    def _clone_each(self, snapshot_id, disks):
        methods = {}
        for disk in disks:
            methods[disk['name']] = method = self.folders.copy(disk['source'], disk['path'])
            log.info('snapshot %s: cloned %s with %s', snapshot_id, disk['parent_path'], method)
        return methods

    def _check_mounted(self, mountpoints, consequence):
        problems = self.inventory.mount_problems(mountpoints)
        absent = [mp for mp in mountpoints if problems.get(mp)]
        if absent:
            raise RepositoryUnavailable('repository %s cannot be used now (%s); %s' % (
                absent[0], problems[absent[0]], consequence))

    def undo_create(self, snapshot_id, disks):
        if self.folders.remove(snapshot_id, [d['repo_mountpoint'] for d in disks]):
            try:
                self.store.forget(snapshot_id)
            except StoreError as exc:  # a 'creating' record is never listed; start-up drops it
                log.error('snapshot %s: files removed, record left for the next start: %s',
                          snapshot_id, exc)

    @staticmethod
    def _clone_failure(exc):
        if isinstance(exc, (ServiceError, StoreError)):
            return exc
        if isinstance(exc, CloneError) and exc.cannot_clone:
            return InvalidRequest(str(exc))
        if isinstance(exc, EnvironmentError):  # CloneError too
            plain = isinstance(exc, CloneError)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return NoSpace(str(exc) if plain else 'no space left: %s' % exc)
            return ServiceFailure(str(exc) if plain else 'snapshot failed: %s' % exc)
        if isinstance(exc, Exception):
            log.error('snapshot failed: %s', traceback.format_exc())
            return ServiceFailure('snapshot failed: %s' % exc)
        return exc  # KeyboardInterrupt, SystemExit: cleaned up, keep going up

    @staticmethod
    def _disk_view(snapshot_id, disk, chunks):
        return {'parent_path': disk['parent_path'], 'path': disk['path'],
                'snapshot_id': snapshot_id, 'name': disk['name'],
                'repo_mountpoint': disk['repo_mountpoint'], 'chunks': chunks}

    def _missing_file(self, snapshot_id, disk):
        """The error for a snapshot file that cannot be found."""
        self._check_mounted([disk['repo_mountpoint']], 'snapshot %s is kept and can be read '
                            'again once it is mounted' % snapshot_id)
        return NotFound('the snapshot file %s is missing' % disk['path'])

    def _disk_map_or_404(self, snapshot_id, disk):
        try:
            return file_extents(disk['path'])
        except (IOError, OSError) as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise self._missing_file(snapshot_id, disk)
            raise

    def get_snapshot(self, vm_id, snapshot_id, squash=True, compare_to=None):
        record = self._snapshot_or_404(vm_id, snapshot_id)
        base = None
        if compare_to is not None:
            base = self._snapshot_or_404(vm_id, compare_to, 'compareTo snapshot')
            if base['seq'] >= record['seq']:
                raise InvalidRequest('compareTo snapshot %s is not older than %s'
                                     % (compare_to, snapshot_id))
        return self._snapshot_view(record, squash, base)

    def _snapshot_view(self, record, squash, base=None):
        """The API's snapshot object, chunks read from the files now (incremental to `base`)."""
        base_disks = dict((d['name'], d) for d in (base['disks'] if base else []))
        disks = []
        for disk in record['disks']:
            extents, size = self._disk_map_or_404(record['id'], disk)
            if disk['name'] in base_disks:
                old_extents, old_size = self._disk_map_or_404(base['id'],
                                                              base_disks[disk['name']])
                chunks = diff_chunks(old_extents, extents, size, old_size)
            else:
                chunks = data_chunks(extents, size)
            if squash:
                chunks = squash_chunks(chunks)
            disks.append(self._disk_view(record['id'], disk, chunks))
        return self._cut_fields({'id': record['id'], 'vm_id': record['vm_id'], 'disks': disks},
                                record['consistency'], record['paused_ms'])

    def list_snapshots(self, vm_id, squash=True):
        """What exists when the list is read: a snapshot deleted meanwhile is left out, and so
        is one in a repository that is not mounted now (logged; its record and its id in the
        VM's "snapshots" stay)."""
        views = []
        for record in self.store.list_for_vm(vm_id):
            try:
                views.append(self._snapshot_view(record, squash))
            except RepositoryUnavailable as exc:
                log.warning('not listing snapshot %s of %s: %s', record['id'], vm_id, exc.details)
            except NotFound:
                now = self.store.get(record['id'])
                if now is not None and now['state'] == 'ready':
                    raise
        return views

    def delete_snapshot(self, vm_id, snapshot_id):
        record = self.store.get(snapshot_id) if UUID_RE.match(snapshot_id) else None
        if record is None:
            return
        if record['vm_id'] != vm_id:
            raise WrongVm('snapshot %s belongs to virtual machine %s, not %s'
                          % (snapshot_id, record['vm_id'], vm_id))
        with self.vm_locks.get(vm_id):
            self.delete_record(record)

    def delete_all(self, vm_id):
        with self.vm_locks.get(vm_id):
            records = self.store.list_for_vm(vm_id, ('ready', 'deleting'))
            self._check_mounted(sorted(set(d['repo_mountpoint'] for r in records
                                           for d in r['disks'])),
                                'nothing was deleted; try again once it is mounted')
            for record in records:
                self.delete_record(record)

    def delete_record(self, record):
        self._check_mounted(sorted(set(d['repo_mountpoint'] for d in record['disks'])),
                            'snapshot %s was not deleted; try again once it is mounted'
                            % record['id'])
        self.store.mark_deleting(record['id'])
        if not self.folders.remove(record['id'], [d['repo_mountpoint'] for d in record['disks']]):
            raise ServiceFailure('could not remove every file of snapshot %s; it stays marked '
                                 'for deletion and is retried at the next start' % record['id'])
        self.store.forget(record['id'])

    def _ready_record(self, vm_id, snapshot_id):
        """_snapshot_or_404 through the in-memory index of ready snapshots."""
        generation = self.store.generation
        if generation != self._ready_generation:
            self._ready = {}
            self._ready_generation = generation
        record = self._ready.get(snapshot_id)
        if record is not None and record['vm_id'] == vm_id:
            return record
        record = self._snapshot_or_404(vm_id, snapshot_id)
        if self.store.generation == generation:
            self._ready[snapshot_id] = record
        return record

    @property
    def generation(self):
        """Changes whenever a snapshot is made, deleted or reconciled."""
        return self.store.generation

    def has_ready_record(self, vm_id, snapshot_id):
        """Whether the index holds this snapshot, so that open_disk needs no state database."""
        record = self._ready.get(snapshot_id)
        return (record is not None and record['vm_id'] == vm_id
                and self.store.generation == self._ready_generation)

    def open_disk(self, vm_id, snapshot_id, disk_name):
        """Return (open binary file, size) of one snapshot disk."""
        record = self._ready_record(vm_id, snapshot_id)
        for disk in record['disks']:
            if disk['name'] == disk_name:
                try:
                    handle = os.fdopen(open_regular_file(disk['path']), 'rb')
                except (IOError, OSError) as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                        raise self._missing_file(snapshot_id, disk)
                    raise
                return handle, os.fstat(handle.fileno()).st_size
        raise NotFound('snapshot %s has no disk %s' % (snapshot_id, disk_name))

    def disk_checksum(self, vm_id, snapshot_id, disk_name, start=0, length=None,
                      block_size=None):
        """The checksum route's answer for bytes [start, start + length) of a snapshot disk
        (length None: to the end; an end past the disk is clamped, like a Range)."""
        handle, size = self.open_disk(vm_id, snapshot_id, disk_name)
        try:
            if start >= size and (start or size):
                raise RangeNotSatisfiable('start %d is not below the disk size %d' % (start, size),
                                          {'Content-Range': 'bytes */%d' % size})
            if length is not None and length < 1:
                raise InvalidRequest('length must be at least 1')
            end = size if length is None else min(size, start + length)
            if block_size is not None:
                if block_size < 1 or block_size % 4096:
                    raise InvalidRequest('block_size must be a positive multiple of 4096')
                if (end - start + block_size - 1) // block_size > CHECKSUM_MAX_BLOCKS:
                    raise InvalidRequest('at most %d blocks per answer: ask for a shorter '
                                         'length or a larger block_size' % CHECKSUM_MAX_BLOCKS)
            try:
                extents = fiemap(handle)
            except EnvironmentError as exc:
                raise ServiceFailure('cannot read the extent map of %s: %s' % (disk_name, exc))
            checksum, blocks = range_checksums(handle, extents, size, start, end - start,
                                               block_size)
        finally:
            handle.close()
        answer = {'algorithm': 'sha256', 'start': start, 'length': end - start,
                  'checksum': checksum}
        if block_size is not None:
            answer['block_size'] = block_size
            answer['blocks'] = blocks
        return answer


def reconcile(service):
    """Finish or undo what a crash interrupted; remove orphans. Returns a summary dict.
    Only what is provably gone is forgotten or deleted: a record or folder in a repository
    that is not mounted now is kept as it is."""
    summary = {'undone_creates': 0, 'finished_deletes': 0, 'orphans_removed': 0,
               'vanished': 0, 'kept_unmounted': 0}
    all_mountpoints = set(service.store.repo_mountpoints())
    try:
        all_mountpoints.update(r['mount_point'] for r in service.inventory.repositories())
    except Exception as exc:
        log.warning('cannot list repositories while reconciling: %s', exc)
    problems = service.inventory.mount_problems(sorted(all_mountpoints))
    for record in service.store.list_all():
        mountpoints = sorted(set(d['repo_mountpoint'] for d in record['disks']))
        absent = [mp for mp in mountpoints if problems.get(mp)]
        if absent:
            log.warning('keeping snapshot %s of %s (%s) as it is: repository %s cannot be '
                        'used now (%s)', record['id'], record['vm_id'], record['state'],
                        absent[0], problems[absent[0]])
            summary['kept_unmounted'] += 1
        elif record['state'] == 'creating':
            log.warning('undoing snapshot %s of %s interrupted while being created',
                        record['id'], record['vm_id'])
            service.undo_create(record['id'], record['disks'])
            summary['undone_creates'] += 1
        elif record['state'] == 'deleting':
            log.warning('finishing the deletion of snapshot %s', record['id'])
            try:
                service.delete_record(record)
                summary['finished_deletes'] += 1
            except ServiceError as exc:
                log.error('%s', exc.details)
        else:
            missing = [d['path'] for d in record['disks'] if _is_missing(d['path'])]
            if missing:
                log.error('snapshot %s of %s lost its files (%s); forgetting it',
                          record['id'], record['vm_id'], ', '.join(missing))
                service.folders.remove(record['id'], mountpoints)
                service.store.forget(record['id'])
                summary['vanished'] += 1
    owned = set(record['id'] for record in service.store.list_all())
    for mountpoint in sorted(problems):
        if problems[mountpoint]:
            continue
        summary['orphans_removed'] += service.folders.sweep(mountpoint, owned)
    return summary


# ------------------------------------------------- authentication: JWT, Manager login, brake ---
#
# Everything the exporter needs to authenticate a client:
#   * constant_time_equal()            - bytes compare that does not leak where they differ;
#   * jwt_encode()/jwt_decode()        - JWT HS256 (the Go service used dgrijalva/jwt-go);
#   * mint_login_token()               - the token handed out by POST /api/v1/auth/login;
#   * ManagerClient.check_login()      - asks the OVM Manager whether a user/password pair is
#                                        valid (GET .../Repository/id with HTTP Basic auth);
#   * LoginBrake                       - per client address brake on repeated failed logins.
#
# Certificates of the OVM Manager (checked before the password is sent):
#   * ca_file:     the chain must verify against that CA file. The host NAME is not checked:
#                  the Manager's certificates come from its private internal CA and
#                  ovm_endpoint is very often a bare IP address, so a name check would refuse
#                  nearly every real Manager; trusting only that private CA is the check.
#   * fingerprint: the SHA-256 of the Manager's DER certificate must match exactly.
#   * otherwise trust on first use: the first certificate seen with a valid login is pinned in
#                  tofu_path; a different certificate later is refused
#                  (ManagerCertificateChanged) until the admin deletes that file or configures
#                  a fingerprint. With tofu_path None as well, any certificate is accepted
#                  (what the Go service did; only for demos).
# With ssl.SSLContext (Python 2.7.9+, 3.x) a context is built per connection; on Python 2.6
# (no SSLContext) ssl.wrap_socket is used (it is gone in 3.12, which always has SSLContext).
# In both cases the peer certificate is read with getpeercert(binary_form=True) and compared
# inside HTTPSConnection.connect(), before any byte of the request is written.


JWT_MAX_TOKEN_LENGTH = 4096
JWT_MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z
JWT_HEADER_HS256 = {'alg': 'HS256', 'typ': 'JWT'}
MANAGER_LOGIN_PATH = '/ovm/core/wsapi/rest/Repository/id'
MANAGER_ANSWER_LIMIT = 4 * 1024 * 1024

_MANAGER_HTTP_EXCEPTION = http_client.HTTPException  # novm (httplib on Python 2)
_JWT_SEGMENT_RE = re.compile(r'^[A-Za-z0-9_-]*$')
_FINGERPRINT_HEX_RE = re.compile(r'^[0-9a-fA-F]{64}$')


# ---------------------------------------------------------------------- constant-time compare

def _auth_constant_time_equal_fallback(a, b):
    """Pure-Python constant-time compare of two byte strings (for Python 2.6)."""
    a = bytearray(a)
    b = bytearray(b)
    if len(a) != len(b):
        # The length is not secret (an HMAC-SHA256 is always 32 bytes); still walk `a`.
        b = a
        result = 1
    else:
        result = 0
    for x, y in zip(a, b):
        result |= x ^ y
    return result == 0


def constant_time_equal(a, b):
    """True when byte strings a and b are equal; time does not depend on where they differ."""
    a = to_bytes(a)
    b = to_bytes(b)
    compare = HMAC_COMPARE_DIGEST
    if compare is not None:
        return bool(compare(a, b))
    return _auth_constant_time_equal_fallback(a, b)


# ------------------------------------------------------------------------------- JWT HS256

class TokenError(Exception):
    """A bearer token is malformed, forged, of the wrong algorithm or expired."""


class TokenRefused(ServiceError):
    """A request without a valid bearer token."""


class LoginRefused(ServiceError):
    """The OVM Manager rejected a user name and password."""


class TooManyLogins(ServiceError):
    """The brute-force brake holds logins from this address or for this user name."""


def _jwt_b64encode(raw):
    return to_native(base64.urlsafe_b64encode(raw).rstrip(b'='))


def _jwt_b64decode(segment, what):
    if not _JWT_SEGMENT_RE.match(segment) or len(segment) % 4 == 1:
        raise TokenError('token {0} is not base64url'.format(what))
    padded = segment + '=' * (-len(segment) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode('ascii'))
    except (TypeError, ValueError, binascii.Error):
        raise TokenError('token {0} is not base64url'.format(what))


def _jwt_json_segment(segment, what):
    raw = _jwt_b64decode(segment, what)
    try:
        value = json_loads_bounded(raw.decode('utf-8'))
    except (ValueError, UnicodeDecodeError):
        raise TokenError('token {0} is not JSON'.format(what))
    if not isinstance(value, dict):
        raise TokenError('token {0} is not a JSON object'.format(what))
    return value


def _jwt_signature(signing_input, secret):
    return hmac.new(to_bytes(secret), signing_input, hashlib.sha256).digest()


def jwt_encode(claims, secret):
    """Sign `claims` (a dict) with HMAC-SHA256; returns the token as a native str (ASCII)."""
    header = json.dumps(JWT_HEADER_HS256, separators=(',', ':'), sort_keys=True)
    payload = json.dumps(claims, separators=(',', ':'), sort_keys=True)
    signing_input = (_jwt_b64encode(header.encode('utf-8')) + '.' +
                     _jwt_b64encode(payload.encode('utf-8')))
    signature = _jwt_signature(signing_input.encode('ascii'), secret)
    return signing_input + '.' + _jwt_b64encode(signature)


def _jwt_is_number(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return False
    return True


def _jwt_time_claim(claims, name):
    """A NumericDate claim (seconds since the epoch, up to year 9999) or None if absent."""
    value = claims.get(name)
    if value is None:
        return None
    if not _jwt_is_number(value) or not 0 <= value <= JWT_MAX_TIMESTAMP:
        raise TokenError('token {0} claim is not a time'.format(name))
    return value


def jwt_decode(token, secret, now=None):
    """Verify an HS256 token and return its claims dict; raise TokenError if it is not valid.

    Accepted: exactly three base64url segments (no padding) of JSON nested at most
    JSON_MAX_DEPTH deep, header alg == "HS256", a signature that matches, a numeric `exp`
    later than `now`, `iat`/`nbf` numeric if present (`nbf` not after `now`), all three in
    0..JWT_MAX_TIMESTAMP. Other claims are not checked.
    """
    if isinstance(token, bytes) and not isinstance(token, str):
        try:
            token = token.decode('ascii')
        except UnicodeDecodeError:
            raise TokenError('token is not ASCII')
    if not isinstance(token, str):
        try:
            token = token.encode('ascii')  # Python 2 unicode -> str
        except (AttributeError, UnicodeError):
            raise TokenError('token is not a string')
    if len(token) > JWT_MAX_TOKEN_LENGTH:
        raise TokenError('token is longer than {0} characters'.format(JWT_MAX_TOKEN_LENGTH))
    parts = token.split('.')
    if len(parts) != 3:
        raise TokenError('token does not have three parts')
    for part in parts:
        if not _JWT_SEGMENT_RE.match(part):
            raise TokenError('token is not made of base64url segments')
    header = _jwt_json_segment(parts[0], 'header')
    if header.get('alg') != 'HS256':
        raise TokenError('token algorithm is not HS256')
    signature = _jwt_b64decode(parts[2], 'signature')
    expected = _jwt_signature((parts[0] + '.' + parts[1]).encode('ascii'), secret)
    if not constant_time_equal(signature, expected):
        raise TokenError('token signature does not match')
    claims = _jwt_json_segment(parts[1], 'claims')
    exp = _jwt_time_claim(claims, 'exp')
    if exp is None:
        raise TokenError('token has no exp claim')
    _jwt_time_claim(claims, 'iat')
    nbf = _jwt_time_claim(claims, 'nbf')
    if now is None:
        now = time.time()
    if exp <= now:
        raise TokenError('token has expired')
    if nbf is not None and nbf > now:
        raise TokenError('token is not valid yet')
    return claims


def mint_login_token(user, secret, ttl_seconds, issuer='ovm_exporter', now=None):
    """The token POST /api/v1/auth/login returns: claims user, exp, iss, iat."""
    if now is None:
        now = time.time()
    now = int(now)
    claims = {'user': user, 'exp': now + int(ttl_seconds), 'iss': issuer, 'iat': now}
    return jwt_encode(claims, secret)


# ------------------------------------------------------------------- OVM Manager login check

class ManagerUnavailable(ServiceError):
    """The OVM Manager could not give an answer (down, timeout, TLS failure, odd status)."""


class ManagerCertificateChanged(ManagerUnavailable):
    """The Manager presents another certificate than the one pinned on first use."""


def normalize_certificate_fingerprint(text):
    """'AA:bb:..' / 'aabb..' / 'sha256 Fingerprint=AA:..' -> 'AA:BB:...' (64 hex digits).

    Raises ValueError when the text is not a SHA-256 fingerprint.
    """
    if isinstance(text, bytes) and not isinstance(text, str):
        text = text.decode('ascii', 'replace')
    value = text.strip()
    if '=' in value:
        value = value.split('=', 1)[1]
    value = re.sub(r'[\s:]', '', value)
    if not _FINGERPRINT_HEX_RE.match(value):
        raise ValueError('{0} is not a SHA-256 certificate fingerprint '
                         '(64 hex digits, colons allowed)'.format(text_repr(text)))
    value = value.upper()
    return ':'.join([value[i:i + 2] for i in range(0, 64, 2)])


def certificate_fingerprint_sha256(der_bytes):
    """SHA-256 of a DER certificate as 'AA:BB:...'."""
    return normalize_certificate_fingerprint(hashlib.sha256(der_bytes).hexdigest())


def _auth_write_file_atomically(path, data, mode=0o600):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=directory)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp_path, mode)
        os.rename(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise


class _ManagerDeadline(object):
    """Ends one Manager call at `seconds` after its start, however slowly the Manager trickles
    its answer (socket time-outs only bound each read): a timer thread shuts the connection
    down through a duplicate of its descriptor, which the call's thread then sees fail."""

    def __init__(self, seconds):
        self.expired = False
        self._end = time.time() + seconds
        self._lock = threading.Lock()
        self._sock = None
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self):
        return self._end - time.time()

    def watch(self, sock):
        """Take a duplicate of the connected TCP socket, to shut down at the deadline."""
        duplicate = socket.fromfd(sock.fileno(), sock.family, socket.SOCK_STREAM)
        with self._lock:
            if not self._done:
                self._sock, duplicate = duplicate, None
                if self.expired:
                    self._shut_down()
        if duplicate is not None:
            duplicate.close()

    def _shut_down(self):
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except socket.error:
            pass

    def _expire(self):
        with self._lock:
            if self._done:
                return
            self.expired = True
            if self._sock is not None:
                self._shut_down()

    def finish(self):
        self._timer.cancel()
        self._timer.join()  # no timer thread outlives its call (Python 2 exits noisily)
        with self._lock:
            self._done = True
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class _ManagerTlsCheck(object):
    """A ManagerClient's certificate policy for one login attempt; remembers the certificate
    seen."""

    def __init__(self, client, pinned, deadline=None):
        self.client = client
        self.pinned = pinned
        self.deadline = deadline
        self.seen_fingerprint = None

    def wrap(self, sock, host):
        # No name check, by design (see the section comment).
        ca_file = self.client.ca_file
        return client_tls(sock, host, ca_file, verify=bool(ca_file))

    def check_peer(self, tls_sock):
        client = self.client
        der = tls_sock.getpeercert(True)
        if not der:
            raise ManagerUnavailable('TLS failure talking to the OVM Manager at {0}: it presented '
                                     'no certificate'.format(client.endpoint))
        seen = certificate_fingerprint_sha256(der)
        self.seen_fingerprint = seen
        if client.fingerprint is not None:
            if not constant_time_equal(seen, client.fingerprint):
                raise ManagerUnavailable(
                    'the OVM Manager at {0} presents certificate sha256 {1}, not the configured '
                    'ovm_certificate_fingerprint {2}'.format(client.endpoint, seen,
                                                             client.fingerprint))
        elif self.pinned is not None:
            if not constant_time_equal(seen, self.pinned):
                raise ManagerCertificateChanged(
                    'the OVM Manager at {0} now presents certificate sha256 {1}, not the one first '
                    'seen ({2}); if this change is expected, delete {3} or set '
                    'ovm_certificate_fingerprint'.format(client.endpoint, seen, self.pinned,
                                                         client.tofu_path))


class _ManagerHTTPResponse(http_client.HTTPResponse):  # novm (httplib on 2)
    """Only a real HTTP/1.x status line is an answer: Python 2's httplib reads an answer
    without one as "HTTP/0.9 200", Python 3 takes "HTTP/0.9" for 1.0."""

    def _read_status(self):
        version, status, reason = http_client.HTTPResponse._read_status(self)  # novm
        if not version.startswith('HTTP/1.'):
            raise http_client.BadStatusLine('no HTTP/1.x status line')  # novm
        return version, status, reason


class _ManagerHTTPSConnection(http_client.HTTPSConnection):  # novm (httplib on 2)
    """HTTPSConnection that does its own TLS wrap and certificate check in connect()."""

    response_class = _ManagerHTTPResponse

    def __init__(self, host, timeout, tls_check):
        http_client.HTTPSConnection.__init__(self, host, timeout=timeout)  # novm
        self._ovm_tls_check = tls_check

    def connect(self):
        deadline = self._ovm_tls_check.deadline
        timeout = self.timeout
        if deadline is not None:
            timeout = min(timeout, deadline.remaining())
            if timeout <= 0:
                raise socket.timeout('timed out')
        sock = socket.create_connection((self.host, self.port), timeout)
        try:
            if deadline is not None:
                deadline.watch(sock)
            tls_sock = self._ovm_tls_check.wrap(sock, self.host)
        except BaseException:
            sock.close()
            raise
        try:
            self._ovm_tls_check.check_peer(tls_sock)
        except BaseException:
            tls_sock.close()
            raise
        self.sock = tls_sock


class _ManagerHTTPSHandler(urllib_request.HTTPSHandler):
    """urllib HTTPS handler that opens _ManagerHTTPSConnection (any Python 2.6-3.13)."""

    def __init__(self, tls_check):
        urllib_request.HTTPSHandler.__init__(self)
        self._ovm_tls_check = tls_check

    def https_open(self, req):
        tls_check = self._ovm_tls_check

        def make_connection(host, **kwargs):
            # do_open passes timeout= (and, on newer Pythons, context=/check_hostname=, which
            # this connection class replaces with its own TLS handling).
            return _ManagerHTTPSConnection(host, kwargs.get('timeout'), tls_check)

        return self.do_open(make_connection, req)


def _manager_failure_sentence(endpoint, timeout, exc):
    """A human sentence for why the Manager gave no answer."""
    reason = exc
    if isinstance(exc, urllib_request.URLError) and not isinstance(exc, urllib_request.HTTPError):
        reason = exc.reason
    text = str(reason) or reason.__class__.__name__
    if isinstance(reason, socket.timeout) or 'timed out' in text:
        return 'the OVM Manager at {0} did not answer within {1:g} seconds'.format(
            endpoint, timeout)
    if isinstance(reason, ssl.SSLError) or reason.__class__.__name__ == 'CertificateError':
        return 'TLS failure talking to the OVM Manager at {0}: {1}'.format(endpoint, text)
    if isinstance(reason, _MANAGER_HTTP_EXCEPTION):
        return ('the OVM Manager at {0} closed the connection or sent no valid HTTP answer '
                '({1}: {2})'.format(endpoint, reason.__class__.__name__, text))
    if isinstance(reason, socket.error) and getattr(reason, 'errno', None) == errno.ECONNREFUSED:
        return 'the OVM Manager at {0} is unreachable (connection refused)'.format(endpoint)
    return 'the OVM Manager at {0} is unreachable: {1}'.format(endpoint, text)


class ManagerClient(object):
    """Checks a user/password pair against the OVM Manager REST API.

    check_login() sends exactly one request, never retries (the Manager may lock accounts),
    follows no redirect, ignores proxy environment variables.
    """

    def __init__(self, endpoint, timeout=10.0, ca_file=None, fingerprint=None, tofu_path=None):
        endpoint = to_native(endpoint.strip()).rstrip('/')
        if not endpoint.lower().startswith('https://') or len(endpoint) <= len('https://'):
            raise ValueError('ovm_endpoint must be an https:// URL, not {0}'.format(
                text_repr(endpoint)))
        if ca_file is not None and not os.path.isfile(ca_file):
            raise ValueError('CA file {0} does not exist'.format(ca_file))
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.ca_file = ca_file
        self.fingerprint = None
        if fingerprint is not None:
            self.fingerprint = normalize_certificate_fingerprint(fingerprint)
        self.tofu_path = tofu_path
        self.url = endpoint + MANAGER_LOGIN_PATH

    def _trust_on_first_use(self):
        return self.ca_file is None and self.fingerprint is None and self.tofu_path is not None

    def pinned_fingerprint(self):
        """The fingerprint stored in tofu_path, or None when nothing is pinned yet."""
        if not self._trust_on_first_use():
            return None
        try:
            f = open(self.tofu_path, 'rb')
        except IOError as e:
            if e.errno == errno.ENOENT:
                return None
            raise ManagerUnavailable('cannot read the pinned OVM Manager certificate from {0}: '
                                     '{1}'.format(self.tofu_path, e))
        try:
            data = f.read(4096)
        finally:
            f.close()
        if not data.strip():
            return None
        try:
            return normalize_certificate_fingerprint(data)
        except ValueError:
            raise ManagerUnavailable(
                '{0} does not hold a SHA-256 certificate fingerprint; delete it to pin the OVM '
                'Manager certificate again on the next login'.format(self.tofu_path))

    def _store_pin(self, fingerprint):
        try:
            _auth_write_file_atomically(self.tofu_path, (fingerprint + '\n').encode('ascii'))
        except (IOError, OSError) as e:
            log.warning('could not store the OVM Manager certificate fingerprint in %s: %s',
                        self.tofu_path, e)
            return
        log.info('pinned the OVM Manager certificate sha256 %s in %s', fingerprint,
                 self.tofu_path)

    def _check_answer(self, response):
        """A 200 counts only with the body the WS-API gives: a JSON list (of SimpleIds)."""
        try:
            body = response.read(MANAGER_ANSWER_LIMIT + 1)
        except (socket.error, ssl.SSLError, _MANAGER_HTTP_EXCEPTION) as e:
            raise ManagerUnavailable(_manager_failure_sentence(self.endpoint, self.timeout, e))
        document = None
        if len(body) <= MANAGER_ANSWER_LIMIT:
            try:
                document = json_loads_bounded(body.decode('utf-8'))
            except (ValueError, UnicodeDecodeError):
                pass
        if not isinstance(document, list):
            raise ManagerUnavailable('the OVM Manager at {0} answered 200 without the JSON list '
                                     'of repositories the WS-API gives'.format(self.endpoint))

    def check_login(self, username, password):
        """True if the Manager accepts the pair (200 with a JSON list), False if it rejects it
        (401/403).

        Raises ManagerUnavailable (or ManagerCertificateChanged) for anything else.
        """
        user_bytes = to_bytes(username)
        password_bytes = to_bytes(password)
        if not user_bytes or not password_bytes or b':' in user_bytes:
            # Basic auth cannot carry such a user name; an empty pair is never valid.
            return False
        pinned = self.pinned_fingerprint()
        deadline = _ManagerDeadline(self.timeout)
        try:
            tls_check = _ManagerTlsCheck(self, pinned, deadline)
            status = self._ask(tls_check, user_bytes, password_bytes)
        except Exception:
            if deadline.expired:
                raise ManagerUnavailable(_manager_failure_sentence(
                    self.endpoint, self.timeout, socket.timeout('timed out')))
            raise
        finally:
            deadline.finish()
        if status == 200:
            seen = tls_check.seen_fingerprint
            if self._trust_on_first_use() and pinned is None and seen is not None:
                self._store_pin(seen)
            return True
        if status in (401, 403):
            return False
        raise ManagerUnavailable('the OVM Manager at {0} answered with unexpected status '
                                 '{1}'.format(self.endpoint, status))

    def _ask(self, tls_check, user_bytes, password_bytes):
        """One GET with Basic auth -> the status (a 200 only with the WS-API's JSON list)."""
        opener = urllib_request.OpenerDirector()
        opener.add_handler(urllib_request.ProxyHandler({}))
        opener.add_handler(_ManagerHTTPSHandler(tls_check))
        credentials = base64.b64encode(user_bytes + b':' + password_bytes)
        request = urllib_request.Request(self.url)
        request.add_header('Authorization', 'Basic ' + to_native(credentials))
        request.add_header('Accept', 'application/json')
        request.add_header('User-Agent', 'ovm_exporter')
        try:
            response = opener.open(request, timeout=self.timeout)
        except ManagerUnavailable:
            raise
        except (urllib_request.URLError, socket.error, ssl.SSLError, socket.timeout,
                _MANAGER_HTTP_EXCEPTION) as e:
            raise ManagerUnavailable(_manager_failure_sentence(self.endpoint, self.timeout, e))
        if response is None:
            raise ManagerUnavailable('the OVM Manager at {0} could not be '
                                     'contacted'.format(self.endpoint))
        try:
            status = getattr(response, 'status', None)
            if status is None:
                status = response.code  # Python 2 addinfourl
            if status == 200:
                self._check_answer(response)
        finally:
            response.close()
        return status


# -------------------------------------------------------------------------- brute-force brake

class LoginBrake(object):
    """Counts failed logins per client address and per user name over a sliding window.

    begin(address, user) -> 0 when a login attempt may go ahead (it is then counted as in
    flight until end(address, user, accepted)), else the whole seconds to wait (for a 429
    Retry-After). Failures and attempts in flight together never exceed max_failures, per
    address and per user name, so concurrent guesses cannot slip past the count. A success
    clears that user name's failures only (also those it left on the address): another
    account's good login does not reset a guesser's count. Memory is bounded: at most
    max_failures timestamps per key and at most max_addresses keys (oldest forgotten first).
    retry_after/record_failure/record_success are the same without the in-flight count.
    """

    def __init__(self, max_failures=5, window_seconds=300, clock=time.time,
                 max_addresses=10000):
        self.max_failures = max(1, int(max_failures))
        self.window_seconds = float(window_seconds)
        self.max_addresses = max(1, int(max_addresses))
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = {}  # key -> [(time, user name), ...] oldest first
        self._in_flight = {}  # key -> attempts begun and not ended
        self._last_sweep = clock()

    def __len__(self):
        with self._lock:
            return len(self._failures)

    @staticmethod
    def _keys(address, user):
        keys = [('address', address)]
        if user is not None:
            keys.append(('user', user))
        return keys

    def _recent(self, key, now):
        stamps = self._failures.get(key)
        if stamps is None:
            return None
        horizon = now - self.window_seconds
        while stamps and stamps[0][0] <= horizon:
            stamps.pop(0)
        if not stamps:
            del self._failures[key]
            return None
        return stamps

    def _sweep(self, now):
        horizon = now - self.window_seconds
        for key in list(self._failures.keys()):
            if self._failures[key][-1][0] <= horizon:
                del self._failures[key]
        self._last_sweep = now

    def _make_room(self, now):
        self._sweep(now)
        excess = len(self._failures) - self.max_addresses + 1
        if excess > 0:
            # Drop the least recently failing tenth (at least what is needed) in one pass.
            excess = max(excess, self.max_addresses // 10)
            by_age = sorted(self._failures.items(), key=lambda item: item[1][-1][0])
            for key, _stamps in by_age[:excess]:
                del self._failures[key]

    def _wait(self, keys, now):
        wait = 0
        for key in keys:
            stamps = self._recent(key, now) or []
            if len(stamps) + self._in_flight.get(key, 0) < self.max_failures:
                continue
            if len(stamps) >= self.max_failures:
                left = stamps[-self.max_failures][0] + self.window_seconds - now
                wait = max(wait, int(math.ceil(left)))
            wait = max(wait, 1)  # attempts in flight: their outcome is due within ovm_timeout
        return wait

    def _failed(self, keys, user, now):
        if now - self._last_sweep >= self.window_seconds:
            self._sweep(now)  # forget stale keys at most once per window
        for key in keys:
            stamps = self._recent(key, now)
            if stamps is None:
                if len(self._failures) >= self.max_addresses:
                    self._make_room(now)
                stamps = []
                self._failures[key] = stamps
            stamps.append((now, user))
            if len(stamps) > self.max_failures:
                del stamps[:len(stamps) - self.max_failures]

    def _succeeded(self, keys, user):
        for key in keys:
            stamps = self._failures.get(key)
            if stamps is None:
                continue
            stamps[:] = [stamp for stamp in stamps if stamp[1] != user]
            if not stamps:
                del self._failures[key]

    def begin(self, address, user):
        keys = self._keys(address, user)
        with self._lock:
            wait = self._wait(keys, self._clock())
            if not wait:
                for key in keys:
                    self._in_flight[key] = self._in_flight.get(key, 0) + 1
            return wait

    def end(self, address, user, accepted):
        """accepted: True (a success), False (a failure) or None (no answer: not counted)."""
        keys = self._keys(address, user)
        with self._lock:
            for key in keys:
                count = self._in_flight.get(key, 0) - 1
                if count > 0:
                    self._in_flight[key] = count
                else:
                    self._in_flight.pop(key, None)
            if accepted:
                self._succeeded(keys, user)
            elif accepted is not None:
                self._failed(keys, user, self._clock())

    def retry_after(self, address, user=None):
        with self._lock:
            return self._wait(self._keys(address, user), self._clock())

    def record_failure(self, address, user=None):
        with self._lock:
            self._failed(self._keys(address, user), user, self._clock())

    def record_success(self, address, user=None):
        with self._lock:
            self._succeeded(self._keys(address, user), user)


TOKEN_CACHE_SIZE = 1024


class Authenticator(object):
    """Logins checked by the OVM Manager, braked per client address; tokens checked locally."""

    INVALID_TOKEN = 'Invalid authentication token'

    def __init__(self, config, resolve_endpoint):
        self.config = config
        self.secret = to_bytes(config.jwt_secret)
        self.brake = LoginBrake(config.api_login_max_failures, config.api_login_failure_window)
        self.resolve_endpoint = resolve_endpoint
        self._verified = {}  # token -> (exp, user): its signature was checked once

    def login(self, username, password, address):
        wait = self.brake.begin(address, username)
        if wait:
            raise TooManyLogins('too many failed logins from %s or for this user name; retry '
                                'in %d seconds' % (address, wait), {'Retry-After': str(wait)})
        accepted = None
        try:
            accepted = self._check(username, password, address)
        finally:
            self.brake.end(address, username, accepted)
        if not accepted:
            log.warning('login of %s from %s rejected by the OVM Manager', text_repr(username),
                        address)
            raise LoginRefused('the OVM Manager rejected this user name and password')
        return mint_login_token(username, self.secret, self.config.jwt_time_to_live)

    def _check(self, username, password, address):
        endpoint = self.resolve_endpoint()
        if not endpoint:
            raise ManagerUnavailable('no OVM Manager to check the login with: set '
                                     'ovm_endpoint, or check manager_ip in the ovs-agent server '
                                     'database')
        config = self.config
        try:
            manager = ManagerClient(endpoint, config.ovm_timeout, config.ovm_ca_certificate or None,
                                    config.ovm_certificate_fingerprint or None,
                                    config.fingerprint_file)
            return manager.check_login(username, password)
        except (ManagerUnavailable, ValueError) as exc:
            log.error('login of %s from %s: %s', text_repr(username), address, exc)
            raise ManagerUnavailable(str(exc))

    def verify_request(self, authorization):
        """`Authorization` header -> the token's user name, or TokenRefused."""
        scheme, _, token = (authorization or '').strip().partition(' ')
        if scheme.lower() != 'bearer' or not token.strip():
            raise TokenRefused(self.INVALID_TOKEN)
        token = token.strip()
        known = self._verified.get(token)
        if known is not None and known[0] > time.time():
            return known[1]
        try:
            claims = jwt_decode(token, self.secret)
        except TokenError:
            self._verified.pop(token, None)
            raise TokenRefused(self.INVALID_TOKEN)
        user = claims.get('user')
        user = user if isinstance(user, string_types) else '-'
        if len(self._verified) >= TOKEN_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (claims['exp'], user)
        return user

# ---------------------------------------------------------------------------------- HTTP ---
#
# An event-driven HTTPS front end (ExporterServer): the main thread accepts connections,
# runs their TLS handshakes and reads their request heads without blocking, each within a
# deadline, and parses the heads with bounds (parse_request_head). Complete requests go to a
# bounded pool of worker threads, so that a connection that waits costs no thread, and no
# client that is slow to send can hold a worker. A small range of a snapshot the service's
# index holds needs neither the state database nor a worker: the front end answers it itself.
# Three layers: ExporterServer owns sockets; ExporterRequestHandler turns one connection's
# Request into bytes on the wire and an access-log line; ApiApplication maps a Request to a
# Response through the route table and the service, and never sees a socket.

REQUEST_LINE_LIMIT = 8192
HEADER_LINE_LIMIT = 8192
HEADER_COUNT_LIMIT = 100
HEADER_BYTES_LIMIT = 65536
BODY_LIMIT = 65536
MAX_RANGES = 1000
LINGER_SECONDS = 3.0
LINGER_BYTES = 1 << 20
# Plain decimal numbers: ASCII digits only (str.isdigit() takes Unicode digits such as
# u'\xb2' that int() refuses), and few enough that int() is cheap and allowed everywhere.
DECIMAL_RE = re.compile(r'[0-9]{1,20}\Z')
STREAM_BUFFER_SIZE = 1 << 20
QUEUE_WAIT_SECONDS = 2.0
QUICK_RANGE_LIMIT = 256 << 10  # a range up to this size is answered by the front end itself
ROUTES_SEEN = 1024             # request targets whose route is remembered
QUICK_FILES = 64               # disk files the front end keeps open for its quick answers
SEND_CHUNK = 256 << 10
SHUTDOWN_GRACE_SECONDS = 30.0
SHUTDOWN_CUT_SECONDS = 5.0
GO_TRUE = ('1', 't', 'T', 'TRUE', 'true', 'True')
GO_FALSE = ('0', 'f', 'F', 'FALSE', 'false', 'False')
ID_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$')
# The request head parser works on native strings (latin-1 on Python 3).
HEAD_CONTROL_RE = re.compile(r'[\x00-\x1f\x7f]')
HEAD_VERSION_RE = re.compile(r'HTTP/([0-9]+)\.([0-9]+)\Z')
HEAD_TOKEN_RE = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+\Z")
SINGLE_RANGE_RE = re.compile(r'bytes=([0-9]{1,20})-([0-9]{1,20})\Z')
_LONE_SURROGATE_RE = re.compile(u'[\ud800-\udbff](?![\udc00-\udfff])|'
                                u'(?<![\ud800-\udbff])[\udc00-\udfff]')

HTTP_REASONS = {200: 'OK', 206: 'Partial Content', 400: 'Bad Request', 401: 'Unauthorized',
                403: 'Forbidden', 404: 'Not Found', 405: 'Method Not Allowed',
                408: 'Request Timeout', 409: 'Conflict', 411: 'Length Required',
                413: 'Payload Too Large', 414: 'URI Too Long',
                416: 'Range Not Satisfiable', 429: 'Too Many Requests',
                431: 'Request Header Fields Too Large', 500: 'Internal Server Error',
                501: 'Not Implemented', 502: 'Bad Gateway', 503: 'Service Unavailable',
                505: 'HTTP Version Not Supported', 507: 'Insufficient Storage'}


class ApiError(Exception):
    """An HTTP answer to a request: a status, a short title and a human sentence. Domain
    errors become one in api_error."""

    def __init__(self, status, title, details, headers=None):
        Exception.__init__(self, details)
        self.status = status
        self.title = title
        self.details = details
        self.headers = headers or {}


def not_found(details):
    return ApiError(404, 'Not Found', details)


def bad_request(details):
    return ApiError(400, 'Bad Request', details)


def _decimal(text):
    """A plain non-negative decimal number -> int, anything else -> None."""
    return int(text) if DECIMAL_RE.match(text) else None


def parse_range_header(value, size):
    """`Range` header -> list of (first, last) inclusive byte positions, clamped to `size`.

    Raises RangeNotSatisfiable for malformed headers and for ranges that all start at or past
    the end (HTTP answers both with 416 and `Content-Range: bytes */size`). Ranges that overlap
    or touch are merged and sorted (RFC 9110 14.2), so that an answer never holds more bytes
    than the file; disjoint ranges keep the order they were asked in."""
    value = value.strip(' \t')
    single = SINGLE_RANGE_RE.match(value)
    if single is not None:
        first, last = int(single.group(1)), int(single.group(2))
        if first <= last and first < size:
            return [(first, min(last, size - 1))]
    if not value.startswith('bytes='):
        raise RangeNotSatisfiable('only byte ranges are supported')
    specs = [s.strip(' \t') for s in value[len('bytes='):].split(',')]
    specs = [s for s in specs if s]
    if not specs or len(specs) > MAX_RANGES:
        raise RangeNotSatisfiable('between 1 and %d ranges are allowed' % MAX_RANGES)
    ranges = []
    for spec in specs:
        first, dash, last = spec.partition('-')
        first, last = first.strip(' \t'), last.strip(' \t')
        start = _decimal(first) if first else None
        end = _decimal(last) if last else None
        if not dash or (first and start is None) or (last and end is None) \
                or not (first or last) or (end is not None and start is not None
                                           and end < start):
            raise RangeNotSatisfiable('malformed range %r' % spec[:40])
        if start is None:  # suffix: the last N bytes
            length = min(end, size)
            if length == 0:
                continue
            ranges.append((size - length, size - 1))
            continue
        if start >= size:
            continue
        ranges.append((start, size - 1 if end is None else min(end, size - 1)))
    if not ranges:
        raise RangeNotSatisfiable('no range overlaps the %d-byte file' % size)
    return coalesce_ranges(ranges)


def coalesce_ranges(ranges):
    """Merge overlapping and adjacent (first, last) ranges; unchanged if none do."""
    ordered = sorted(ranges)
    merged = [ordered[0]]
    for first, last in ordered[1:]:
        if first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return ranges if len(merged) == len(ranges) else merged


def quick_range_bytes(value):
    """The bytes a Range header of explicit `first-last` ranges asks for, if at most
    QUICK_RANGE_LIMIT; else None."""
    value = value.strip(' \t')
    single = SINGLE_RANGE_RE.match(value)
    if single is not None:
        total = int(single.group(2)) - int(single.group(1)) + 1
        return total if total <= QUICK_RANGE_LIMIT else None
    if not value.startswith('bytes='):
        return None
    total = 0
    for spec in value[6:].split(','):
        first, dash, last = spec.strip(' \t').partition('-')
        if not (DECIMAL_RE.match(first) and DECIMAL_RE.match(last)):
            return None
        total += int(last) - int(first) + 1
        if total > QUICK_RANGE_LIMIT:
            return None
    return total


def parse_go_bool(value, name):
    if value in GO_TRUE:
        return True
    if value in GO_FALSE:
        return False
    raise bad_request('%s must be a boolean (true or false), not %s' % (name, text_repr(value)))


_http_date_cache = [None, '']


def http_date(timestamp=None):
    if timestamp is not None:
        return time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime(timestamp))
    now = int(time.time())
    cache = _http_date_cache
    if cache[0] != now:  # one strftime a second (a race only makes two)
        cache[1] = time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime(now))
        cache[0] = now
    return cache[1]


_access_time_cache = [None, '']


def access_log_time(timestamp):
    """The access log's time field, formatted once a second."""
    second = int(timestamp)
    cache = _access_time_cache
    if cache[0] != second:
        cache[1] = time.strftime('%d/%b/%Y:%H:%M:%S +0000', time.gmtime(second))
        cache[0] = second
    return cache[1]


# An access-log field is one run of printable ASCII without quotes or backslashes: anything
# else becomes \xNN, so that one request is one log line whatever its headers hold.
LOG_UNSAFE_RE = re.compile(u'[^\\x20\\x21\\x23-\\x5b\\x5d-\\x7e]')
LOG_SECRET_PARAMETER_RE = re.compile(
    u'([?&;][^=&;#\\s]*(?:token|jwt|passw|secret|auth|key)[^=&;#\\s]*=)[^&;#\\s]*',
    re.IGNORECASE)
LOG_JWT_RE = re.compile(u'eyJ[A-Za-z0-9_.=%+/-]*')
LOG_PLAIN_RE = re.compile(u'[\\x20\\x21\\x23-\\x3c\\x3e-\\x5b\\x5d-\\x7e]*\\Z')  # safe, no "="


def _log_escape(match):
    code = ord(match.group(0))
    if code < 256:
        return '\\x%02x' % code
    return ('\\u%04x' if code < 0x10000 else '\\U%08x') % code


def log_field(value, limit):
    """A request field for the access log: cut to `limit`, secrets redacted, escaped."""
    if value is None:
        return '-'
    if isinstance(value, bytes):
        value = value.decode('latin-1')
    value = value[:limit]
    if LOG_PLAIN_RE.match(value) and 'eyJ' not in value:  # nothing to escape or redact
        return str(value)
    value = LOG_SECRET_PARAMETER_RE.sub(u'\\1[redacted]', value)
    value = LOG_JWT_RE.sub(u'[redacted]', value)
    return str(LOG_UNSAFE_RE.sub(_log_escape, value))


def set_tcp_nodelay(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, socket.error):
        pass


class TlsSetupError(ValueError):
    """The server's certificate or key cannot serve; `key` names the config key to fix."""

    def __init__(self, key, message):
        ValueError.__init__(self, message)
        self.key = key


def _der_element(data, pos):
    """-> (tag, start of content, end of content) of the DER element at `pos`."""
    tag, length = ord(data[pos:pos + 1]), ord(data[pos + 1:pos + 2])
    pos += 2
    if length & 0x80:
        count = length & 0x7f
        length = int(binascii.hexlify(data[pos:pos + count]) or b'0', 16)
        pos += count
    if pos + length > len(data):
        raise ValueError('truncated DER')
    return tag, pos, pos + length


def certificate_not_after(der):
    """The end of an X.509 certificate's validity (DER bytes), as a Unix time."""
    import calendar
    _, pos, _ = _der_element(der, 0)          # Certificate
    _, pos, _ = _der_element(der, pos)        # TBSCertificate
    tag, _, end = _der_element(der, pos)
    if tag == 0xa0:                           # [0] version
        pos = end
    for _ in range(3):                        # serialNumber, signature, issuer
        pos = _der_element(der, pos)[2]
    _, pos, _ = _der_element(der, pos)        # validity
    pos = _der_element(der, pos)[2]           # notBefore
    tag, start, end = _der_element(der, pos)  # notAfter: UTCTime or GeneralizedTime
    text = der[start:end].decode('ascii').rstrip('Z')
    if tag == 0x17:
        text = ('19' if int(text[:2]) >= 50 else '20') + text
    return calendar.timegm(time.strptime(text[:14], '%Y%m%d%H%M%S'))


def tls_self_test(config, wrap, timeout=10.0):
    """A TLS handshake of the server's own `wrap` with a client over a socket pair. Python 2.6
    loads a key that does not match the certificate without a word (OpenSSL then drops the
    key and every handshake fails); an expired certificate fails every verifying client.
    Raises TlsSetupError naming the key to fix."""
    server_end, client_end = socket.socketpair()
    if PY2:
        server_end, client_end = socket.socket(_sock=server_end), socket.socket(_sock=client_end)
    server_end.settimeout(timeout)
    client_end.settimeout(timeout)
    seen = {}

    def client():
        try:
            tls = client_tls(client_end, None, verify=False)
            seen['der'] = tls.getpeercert(True)
            tls.close()
        except Exception as exc:
            seen['error'] = exc
    worker = threading.Thread(target=client)
    worker.daemon = True
    worker.start()
    failure = server_tls = None
    try:
        server_tls = wrap(server_end)
    except (ssl.SSLError, socket.error, socket.timeout, OSError, ValueError) as exc:
        failure = exc
        for end in (server_end, client_end):
            try:
                end.shutdown(socket.SHUT_RDWR)  # the client must not wait for more
            except (socket.error, OSError, ValueError):
                pass
    worker.join(timeout)
    for end in (server_tls, server_end, client_end):
        if end is not None:
            end.close()
    certificate, key = config.api_tls_certificate, config.api_tls_key
    if failure is not None:
        raise TlsSetupError('api.tls.key', '%s does not match the certificate %s: a TLS '
                            'handshake with them fails (%s)' % (key, certificate, failure))
    if not seen.get('der'):
        raise TlsSetupError('api.tls', 'a TLS handshake with the certificate %s and the key %s '
                            'fails (%s)' % (certificate, key, seen.get('error', 'time-out')))
    try:
        not_after = certificate_not_after(seen['der'])
    except (ValueError, IndexError, TypeError):
        return
    if not_after < time.time():
        raise TlsSetupError('api.tls.certificate', '%s expired on %s' % (
            certificate, time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(not_after))))


def make_server_tls(config):
    """Return a function that wraps an accepted socket in TLS (doing the handshake unless
    told not to: the front end runs it without blocking), after a handshake with itself
    (tls_self_test). Raises TlsSetupError, ssl.SSLError, IOError."""
    tls_self_test(config, _server_tls_wrap(config, False))
    return _server_tls_wrap(config, config.api_tls_require_client_certificate)


def _server_tls_wrap(config, require_client):
    certfile, keyfile = config.api_tls_certificate, config.api_tls_key
    cafile = config.api_tls_ca_certificate or None
    if HAVE_SSLCONTEXT:
        context = ssl.SSLContext(getattr(ssl, 'PROTOCOL_TLS_SERVER', ssl.PROTOCOL_SSLv23))  # novm
        if hasattr(context, 'minimum_version'):
            context.minimum_version = ssl.TLSVersion.TLSv1_2  # novm
        else:
            for name in ('OP_NO_SSLv2', 'OP_NO_SSLv3', 'OP_NO_TLSv1', 'OP_NO_TLSv1_1'):
                context.options |= getattr(ssl, name, 0)
        context.options |= getattr(ssl, 'OP_NO_COMPRESSION', 0)
        try:
            context.load_cert_chain(certfile, keyfile)
        except ssl.SSLError as exc:
            if 'KEY_VALUES_MISMATCH' in str(exc):
                raise TlsSetupError('api.tls.key', '%s does not match the certificate %s (%s)'
                                    % (keyfile, certfile, exc))
            raise
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile)

        def wrap(sock, handshake=True):
            return context.wrap_socket(sock, server_side=True,
                                       do_handshake_on_connect=handshake)
    else:
        # Python 2.6: no SSLContext. PROTOCOL_SSLv23 negotiates TLS 1.2 with OpenSSL 1.0.1.
        # The files are loaded at each wrap: a key that does not match the certificate only
        # shows in a handshake (tls_self_test).
        options = dict(server_side=True, certfile=certfile, keyfile=keyfile,
                       ssl_version=ssl.PROTOCOL_SSLv23,
                       cert_reqs=ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE,
                       ca_certs=cafile if require_client else None)
        probe, peer = socket.socketpair()
        if PY2:
            probe, peer = socket.socket(_sock=probe), socket.socket(_sock=peer)
        try:  # on a connected socket: loads (so checks) the certificate and key now
            ssl.wrap_socket(probe, do_handshake_on_connect=False, **options)
        finally:
            probe.close()
            peer.close()

        def wrap(sock, handshake=True):
            tls = ssl.wrap_socket(sock, do_handshake_on_connect=False, **options)
            return legacy_handshake(tls) if handshake else tls
    return wrap


class RequestHeaders(object):
    """The header fields of one request: names case-insensitive, repeated fields kept."""

    def __init__(self):
        self._fields = {}  # lower-case name -> [values]
        self._order = []   # (name, value) as sent

    def add(self, name, value):
        self._fields.setdefault(name.lower(), []).append(value)
        self._order.append((name, value))

    def get(self, name, default=None):
        values = self._fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name, failobj=None):
        values = self._fields.get(name.lower())
        return list(values) if values else failobj

    def items(self):
        return list(self._order)

    def __contains__(self, name):
        return name.lower() in self._fields

    def __len__(self):
        return len(self._order)


class Request(object):
    """One request as the application sees it: the parsed head (or the ApiError that answers
    a malformed one), who sent it, and its body through read_body(). No socket, no handler:
    the connection layer sets `client_address` and `read` (n -> up to n body bytes)."""

    def __init__(self, requestline, method=None, target=None, version=None, headers=None,
                 keep_alive=False, error=None):
        self.requestline = requestline
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.error = error
        self.route = None  # (urlsplit, route) once ApiApplication has looked
        self.client_address = None
        self.read = None
        self.user = '-'
        self.content_length = 0
        self.body_done = False  # the whole request is read: the connection can go on
        self.close = False      # the connection must close after the answer
        self.quick = False      # answered by the front end (ApiApplication.is_quick)

    def check_body_framing(self):
        """Content-Length as a number (0 without). Every value, of repeated headers and
        comma lists, must be the same plain decimal number: else 400 (RFC 9112 6.3)."""
        values = []
        for value in self.headers.get_all('Content-Length', ()):
            values.extend([part.strip(' \t') for part in value.split(',')])
        if not values:
            self.content_length = 0
            self.body_done = not self.headers.get('Transfer-Encoding')
            return
        lengths = set([_decimal(value) for value in values])
        if None in lengths:
            raise bad_request('Content-Length must be a plain decimal number of bytes')
        if len(lengths) > 1:
            raise bad_request('the request has conflicting Content-Length values')
        self.content_length = lengths.pop()
        self.body_done = not self.headers.get('Transfer-Encoding') and not self.content_length

    def read_body(self, limit=BODY_LIMIT):
        if self.headers.get('Transfer-Encoding'):
            raise ApiError(411, 'Length Required', 'send the request body with Content-Length')
        length = self.content_length
        if length > limit:
            self.close = True
            if length <= 16 * limit:  # drain it, so that the client reads our answer
                while length > 0:
                    length -= len(self.read(min(length, 65536)) or b'x' * length)
                self.body_done = True
            raise ApiError(413, 'Payload Too Large', 'the request body exceeds %d bytes' % limit)
        body = self.read(length) if length else b''
        if len(body) != length:
            raise bad_request('the request body ended early')
        self.body_done = True
        return body


class Response(collections.namedtuple('Response',
                                       'status headers body file parts tail closes_file')):
    """An answer: a status, header pairs, and a body of bytes or of `parts` of an open
    `file`: (part head or None, start, length) each, then `tail`. Whoever sends it closes
    it."""
    __slots__ = ()

    def __new__(cls, status, headers=(), body=b'', file=None, parts=(), tail=b'',
                closes_file=True):
        return super(Response, cls).__new__(cls, status, headers, body, file, parts, tail,
                                            closes_file)

    @classmethod
    def json(cls, status, obj, headers=()):
        return cls(status, [('Content-Type', 'application/json')] + list(headers),
                   to_bytes(json_dumps(obj)))

    @classmethod
    def error(cls, exc):
        """The answer to an ApiError."""
        return cls.json(exc.status, {'error': exc.title, 'details': exc.details},
                        sorted(exc.headers.items()))

    def length(self):
        if self.file is None:
            return len(self.body)
        total = len(self.tail)
        for head, _, length in self.parts:
            total += length if head is None else len(head) + length + 2
        return total

    def close(self):
        if self.file is not None and self.closes_file:
            self.file.close()


def _native_text(raw):
    return raw if PY2 else raw.decode('latin-1')


def check_request_line(line):
    """`METHOD target HTTP/1.x` (native str, without its line end) -> (method, target,
    version). Refuses anything else with 400, another HTTP version with 505."""
    words = line.split(' ')
    if len(words) != 3 or HEAD_CONTROL_RE.search(line):
        if HEAD_CONTROL_RE.search(line):
            raise bad_request('the request line holds a control character')
        raise bad_request('the request line must be "METHOD /path HTTP/1.1"')
    method, target, version = words
    if version not in ('HTTP/1.1', 'HTTP/1.0'):
        match = HEAD_VERSION_RE.match(version)
        if match is None or not method or not target:
            raise bad_request('the request line must be "METHOD /path HTTP/1.1"')
        if match.group(1) != '1' or len(match.group(2)) != 1:
            raise ApiError(505, 'HTTP Version Not Supported',
                           'this server speaks HTTP/1.1 and HTTP/1.0')
    if not target or not HEAD_TOKEN_RE.match(method):
        raise bad_request('the request line must be "METHOD /path HTTP/1.1"')
    return method, target, version


def _strip_line_end(line):
    if line.endswith(b'\n'):
        line = line[:-1]
    if line.endswith(b'\r'):
        line = line[:-1]
    return line


def parse_request_head(data):
    """A whole request head (bytes up to and with the empty line) -> Request. Bounded:
    no line, count or total beyond the limits; malformed heads get a Request with the
    ApiError that answers them. Replaces BaseHTTPRequestHandler's parser (email.parser)."""
    text = data if PY2 else data.decode('latin-1')
    if '\r' in text:
        text = text.replace('\r\n', '\n')
    lines = text.split('\n')
    requestline = lines[0]
    try:
        if len(requestline) + 2 > REQUEST_LINE_LIMIT:
            raise ApiError(414, 'URI Too Long', 'the request line is longer than %d bytes'
                           % REQUEST_LINE_LIMIT)
        method, target, version = check_request_line(requestline)
        if len(lines) - 3 >= HEADER_COUNT_LIMIT or len(data) > HEADER_BYTES_LIMIT or (
                len(data) > HEADER_LINE_LIMIT
                and max([len(line) for line in lines]) + 2 > HEADER_LINE_LIMIT):
            raise ApiError(431, 'Request Header Fields Too Large',
                           'the request headers exceed %d lines or %d bytes'
                           % (HEADER_COUNT_LIMIT, HEADER_BYTES_LIMIT))
        headers = RequestHeaders()
        fields, order = headers._fields, headers._order
        for line in lines[1:]:
            if not line:
                continue
            if line[0] in ' \t' and order:  # obs-fold: the field goes on (RFC 9112 5.2)
                name, value = order.pop()
                value = value + '\n' + line.rstrip(' \t')
                fields[name.lower()][-1] = value
                order.append((name, value))
                continue
            # A line that is no `name:` field would end other parsers' headers early: what
            # follows, Content-Length too, would be lost (request smuggling).
            name, colon, value = line.partition(':')
            if not colon or not HEAD_TOKEN_RE.match(name):
                raise bad_request('a header line is not "Name: value"')
            value = value.strip(' \t')
            key = name.lower()
            if key in fields:
                fields[key].append(value)
            else:
                fields[key] = [value]
            order.append((name, value))
        connection = fields.get('connection')
        connection = connection[0].lower() if connection else ''
        if version == 'HTTP/1.1':
            keep_alive = 'close' not in connection
        else:
            keep_alive = 'keep-alive' in connection
        return Request(requestline, method, target, version, headers, keep_alive)
    except ApiError as exc:
        return Request(requestline, error=exc)


def _body_to_wait_for(head):
    """How many body bytes the front end waits for before it hands the request on: a small
    body declared once with Content-Length; else none (the worker answers or reads it)."""
    if head.error is not None or head.headers.get('Transfer-Encoding') is not None:
        return 0
    values = head.headers.get_all('Content-Length') or []
    if len(values) != 1 or not DECIMAL_RE.match(values[0].strip(' \t')):
        return 0
    length = int(values[0].strip(' \t'))
    return length if length <= BODY_LIMIT else 0


_HANDSHAKE, _WAITING, _SENDING, _QUEUED, _WORKING = range(5)  # <= _SENDING: the front end's
_WANT = (ssl.SSL_ERROR_WANT_READ, ssl.SSL_ERROR_WANT_WRITE)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


def find_head_end(buffer, start):
    """Where the request head in `buffer` ends (after its empty line: the first "\n\n" or
    "\n\r\n" from `start`), or -1 while it has not all arrived."""
    bare = buffer.find(b'\n\n', start)
    crlf = buffer.find(b'\n\r\n', start, bare + 1 if bare >= 0 else len(buffer))
    if crlf >= 0:
        return crlf + 3
    return bare + 2 if bare >= 0 else -1


class _Connection(object):
    """One accepted connection. The front end owns it while it handshakes or waits for a
    request; a worker owns it while one of its requests is worked on."""

    __slots__ = ('sock', 'tls', 'fd', 'address', 'state', 'buffer', 'scanned', 'deadline',
                 'since', 'head', 'body', 'handler', 'queued_at', 'out', 'sent', 'chunk',
                 'keep')

    def __init__(self, fd, sock, tls, address, now):
        self.sock = sock
        self.tls = tls
        self.fd = fd
        self.address = address
        self.state = _HANDSHAKE
        self.buffer = b''
        self.scanned = 0
        self.deadline = None
        self.since = now
        self.head = None
        self.body = 0
        self.handler = None
        self.queued_at = None
        self.out = b''     # an answer the front end is sending, from offset `sent`
        self.sent = 0
        self.chunk = None  # the block a send could not take: offered again, the same object
        self.keep = False

    def read_some(self, size=65536):
        """One read of TLS data: bytes, b'' at the end, None if nothing is there yet."""
        try:
            return self.tls.read(size) if PY2 else self.tls.recv(size)
        except ssl.SSLError as exc:
            if exc.args and exc.args[0] in _WANT:
                return None
            raise
        except (socket.error, OSError) as exc:
            if exc.args and exc.args[0] in _AGAIN:
                return None
            raise


class ExporterServer(object):
    """The front end: one thread with poll() accepts connections, runs their TLS handshakes
    and reads their request heads without blocking, each against a deadline, and hands
    complete requests to a bounded pool of worker threads. A waiting connection costs no
    thread; `max_connections` bounds the requests being worked on; one client address holds
    at most half the workers; when file descriptors run short the oldest idle connections are
    closed first."""

    def __init__(self, config, app, tls_wrap):
        self.config = config
        self.app = app
        self.tls_wrap = tls_wrap
        self.max_workers = max(1, config.api_max_connections)
        self.max_connections = self.max_workers
        self.address_share = max(1, self.max_workers // 2)
        self.handshake_timeout = config.api_handshake_timeout
        self.head_timeout = config.api_handshake_timeout
        self.idle_timeout = config.api_idle_timeout
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._ready = []          # connections with a complete request, oldest first
        self._returned = []       # connections a worker gives back to the front end
        self._busy = {}           # client address -> requests being worked on
        self._working = 0
        self._workers = 0
        self._threads = []        # the workers' threads, joined at shutdown
        self._idle_workers = 0
        self._signalled = False
        self._signal = None       # the signal that stopped the server
        self._stopping = False
        self._connections = {}    # fd -> _Connection, all of them
        self._poller = None
        self._listening = True
        self._refused = 0
        self.access_lines = []    # of the front end's quick answers, written once per turn
        self._wakeup_r, self._wakeup_w = os.pipe()
        for fd in (self._wakeup_r, self._wakeup_w):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        family, socktype, proto, _, address = socket.getaddrinfo(
            config.api_bind, config.api_port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        self.listener = socket.socket(family, socktype, proto)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(address)
        self.listener.listen(1024)
        self.listener.setblocking(0)
        self.address = self.listener.getsockname()[:2]
        self._base_descriptors = _open_descriptor_count()
        self._budget = self._descriptor_budget()

    @property
    def active_connections(self):
        return len(self._connections)

    @property
    def stopping(self):
        return self._stopping

    def stop(self, signum=None):
        """Stop accepting; running transfers get SHUTDOWN_GRACE_SECONDS to finish. Safe in a
        signal handler: it takes no lock and logs nothing (the handler runs in the front end's
        thread, maybe inside a logging call: Python 2's RLock would deadlock there)."""
        self._signal = signum
        self._stopping = True
        self._wake()

    def _wake(self):
        try:
            os.write(self._wakeup_w, b'x')
        except OSError:
            pass

    # -- the front end's loop
    def serve_forever(self):
        self._poller = poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wakeup_r, select.POLLIN)
        listener_fd = self.listener.fileno()
        next_sweep = 0
        while not self._stopping:
            try:
                events = poller.poll(250)
            except (select.error, OSError, IOError) as exc:
                if exc.args and exc.args[0] == errno.EINTR:
                    continue
                raise
            for fd, event in events:
                if fd == listener_fd:
                    self._accept()
                elif fd == self._wakeup_r:
                    self._take_back()
                else:
                    connection = self._connections.get(fd)
                    if connection is None or connection.state > _SENDING:
                        continue
                    if connection.state == _HANDSHAKE:
                        self._handshake(connection)
                    elif connection.state == _WAITING:
                        self._receive(connection)
                    else:
                        self._send(connection, True)
            if self.access_lines:
                lines, self.access_lines = self.access_lines, []
                log_lines(lines)
            now = time.time()
            if now >= next_sweep:
                next_sweep = now + 0.25
                self._sweep(now)
        return self._shut_down()

    def _accept(self):
        for _ in range(256):
            if len(self._connections) >= self._budget:
                if not self._close_oldest_idle():
                    self._pause_listening()
                    return
            try:
                sock, address = self.listener.accept()
            except (socket.error, OSError) as exc:
                code = exc.args[0] if exc.args else None
                if code in _AGAIN or code == errno.ECONNABORTED:
                    return
                if code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._close_oldest_idle():
                        log.warning('out of file descriptors: %d connections open',
                                    len(self._connections))
                        self._pause_listening()
                    return
                raise
            now = time.time()
            fd = sock.fileno()
            try:
                sock.setblocking(0)
                set_tcp_nodelay(sock)
                tls = self.tls_wrap(sock, handshake=False)  # Python 3: takes `sock` over
            except (ssl.SSLError, socket.error, OSError, ValueError) as exc:
                log.debug('cannot set up TLS for %s: %s', address[0], exc)
                self._close_quietly(sock)
                continue
            connection = _Connection(fd, sock, tls, address, now)
            connection.deadline = now + self.handshake_timeout
            self._connections[connection.fd] = connection
            self._poller.register(connection.fd, select.POLLIN)

    def _descriptor_budget(self):
        """Connections that may be open, keeping descriptors for workers' files."""
        try:
            import resource
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, ValueError, OSError):
            return 1 << 30
        if soft == getattr(__import__('resource'), 'RLIM_INFINITY', -1):
            return 1 << 30
        return max(8, soft - self._base_descriptors - 16 - 4 * self.max_workers)

    def _close_oldest_idle(self):
        """Close the oldest connections nobody works on (1/16 of them); False if none."""
        idle = [c for c in self._connections.values() if c.state <= _WAITING]  # not _SENDING
        if not idle:
            return False
        idle.sort(key=lambda c: c.since)
        for connection in idle[:max(1, len(idle) // 16)]:
            self._close(connection)
        return True

    def _pause_listening(self):
        if self._listening:
            self._listening = False
            self._poller.unregister(self.listener.fileno())

    def _handshake(self, connection):
        try:
            connection.tls.do_handshake()
        except ssl.SSLError as exc:
            code = exc.args[0] if exc.args else None
            if code == ssl.SSL_ERROR_WANT_READ:
                self._poller.modify(connection.fd, select.POLLIN)
                return
            if code == ssl.SSL_ERROR_WANT_WRITE:
                self._poller.modify(connection.fd, select.POLLOUT)
                return
            log.debug('TLS handshake with %s failed: %s', connection.address[0], exc)
            self._close(connection)
            return
        except (socket.error, OSError, ValueError) as exc:
            log.debug('TLS handshake with %s failed: %s', connection.address[0], exc)
            self._close(connection)
            return
        connection.handler = ExporterRequestHandler(connection, self)
        self._await_request(connection)
        self._receive(connection)

    def _await_request(self, connection, register=False):
        """The connection waits for a request, for at most idle_timeout from now."""
        now = time.time()
        connection.state = _WAITING
        connection.since = now
        connection.deadline = now + self.idle_timeout
        if register:
            self._poller.register(connection.fd, select.POLLIN)
        else:
            self._poller.modify(connection.fd, select.POLLIN)

    def _receive(self, connection):
        """Read what the client sent; pass each request on once its head (and small body)
        is in. One read a turn (poll reports what is left): a second read would mostly find
        nothing, at the cost of a system call."""
        while True:
            ended = False
            try:
                if len(connection.buffer) < (HEADER_BYTES_LIMIT + REQUEST_LINE_LIMIT
                                             + BODY_LIMIT):
                    block = connection.read_some()
                    if block is not None:
                        ended = not block
                        connection.buffer += block
            except (ssl.SSLError, socket.error, OSError, ValueError) as exc:
                # an end without TLS close_notify (OpenSSL 3 without the option to ignore it)
                log.debug('connection to %s ended: %s', connection.address[0], exc)
                ended = True
            self._examine(connection)
            if ended and connection.state == _WAITING:
                if connection.head is not None:  # its body ended early: a worker says so
                    connection.body = 0
                    self._queue(connection, connection.head, time.time())
                else:
                    log.debug('connection to %s ended by the client', connection.address[0])
                    self._close(connection)
                return
            if connection.state != _WAITING or not connection.tls.pending():
                return

    def _examine(self, connection):
        """Pass on every complete request in the buffer, while the front end has the
        connection."""
        while connection.state == _WAITING and connection.buffer:
            if not self._examine_one(connection, time.time()):
                return

    def _examine_one(self, connection, now):
        if connection.head is None:
            if connection.scanned == 0:
                connection.buffer = connection.buffer.lstrip(b'\r\n')
                if not connection.buffer:
                    return False
                connection.deadline = min(connection.deadline, now + self.head_timeout)
            buffer = connection.buffer
            end = find_head_end(buffer, max(0, connection.scanned - 3))
            if end < 0:
                connection.scanned = len(buffer)
                error = self._early_error(buffer)
                if error is not None:
                    self._queue(connection, Request(error[0], error=error[1]), now)
                return False
            connection.head = parse_request_head(buffer[:end])
            connection.buffer = buffer[end:]
            connection.body = _body_to_wait_for(connection.head)
        if len(connection.buffer) < connection.body:
            return False
        head = connection.head
        if head.error is None and not self._stopping and self.app.is_quick(head):
            self._answer_now(connection, head)
        else:
            self._queue(connection, head, now)
        return True

    def _answer_now(self, connection, request):
        """A quick request (a small range): answered here, without a worker; the answer is
        built in memory and sent without blocking."""
        out = []
        try:
            connection.keep = connection.handler.serve_request(request, out)
        except Exception:
            log.error('connection from %s failed: %s', connection.address[0],
                      traceback.format_exc())
            connection.keep = False
        connection.head = None
        connection.body = 0
        connection.scanned = 0
        connection.out = b''.join(out)
        connection.sent = 0
        connection.state = _SENDING
        self._send(connection)

    def _send(self, connection, polled=False):
        """Send what the socket takes of the answer; the rest when poll says it can."""
        out = connection.out
        while connection.sent < len(out):
            chunk = connection.chunk
            if chunk is None:  # (a slice of bytes is a copy)
                chunk = out if len(out) <= SEND_CHUNK else out[connection.sent:
                                                               connection.sent + SEND_CHUNK]
            try:
                count = connection.tls.send(chunk)
            except ssl.SSLError as exc:
                if not exc.args or exc.args[0] not in _WANT:
                    self._close(connection)
                    return
                count = 0
            except (socket.error, OSError, ValueError) as exc:
                if not exc.args or exc.args[0] not in _AGAIN:
                    self._close(connection)
                    return
                count = 0
            if not count:  # Python 2.6: the same block must be offered again
                connection.chunk = chunk
                self._poller.modify(connection.fd, select.POLLOUT)
                return
            connection.chunk = None if count == len(chunk) else chunk[count:]
            connection.sent += count
        connection.out = b''
        connection.sent = 0
        if not connection.keep or self._stopping:
            self._close(connection)
            return
        self._await_request(connection)
        if polled and (connection.buffer or connection.tls.pending()):
            self._receive(connection)

    @staticmethod
    def _early_error(buffer):
        """(request line, ApiError) for a head that is already wrong before it is complete."""
        line_end = buffer.find(b'\n')
        if line_end < 0:
            if len(buffer) > REQUEST_LINE_LIMIT:
                return _native_text(buffer[:256]), ApiError(
                    414, 'URI Too Long', 'the request line is longer than %d bytes'
                    % REQUEST_LINE_LIMIT)
            return None
        line = _native_text(_strip_line_end(buffer[:line_end + 1]))
        try:
            check_request_line(line)
        except ApiError as exc:
            return line, exc
        if len(buffer) > HEADER_BYTES_LIMIT:
            return line, ApiError(
                431, 'Request Header Fields Too Large',
                'the request headers exceed %d lines or %d bytes'
                % (HEADER_COUNT_LIMIT, HEADER_BYTES_LIMIT))
        return None

    def _queue(self, connection, head, now):
        connection.head = head
        connection.state = _QUEUED
        connection.queued_at = now
        connection.scanned = 0
        self._poller.unregister(connection.fd)
        with self._lock:
            self._ready.append(connection)
            if self._idle_workers:
                self._work.notify()
                return
            if self._workers >= self.max_workers:
                return
            self._workers += 1
            worker = threading.Thread(target=self._worker)
            worker.daemon = True
            self._threads = [t for t in self._threads if t.is_alive()] + [worker]
        worker.start()

    def _sweep(self, now):
        self.app.close_stale_files()
        self._budget = self._descriptor_budget()  # the limit can change under a running process
        if not self._listening and len(self._connections) < self._budget:
            self._listening = True
            self._poller.register(self.listener.fileno(), select.POLLIN)
        for connection in list(self._connections.values()):
            if connection.state <= _SENDING and connection.deadline < now:
                if connection.buffer or connection.scanned:
                    log.info('%s: the request head did not arrive within %.0fs; closed',
                             connection.address[0], self.head_timeout)
                self._close(connection)
        refused = []
        with self._lock:
            while self._ready and self._ready[0].queued_at < now - QUEUE_WAIT_SECONDS:
                refused.append(self._ready.pop(0))
        for connection in refused:
            self._refuse(connection)

    def _refuse(self, connection):
        """503 to a request that waited QUEUE_WAIT_SECONDS for a worker; sent without
        blocking (it is small), then the connection is closed."""
        body = to_bytes(json_dumps({'error': 'Service Unavailable',
                                    'details': 'too many requests in progress; retry shortly'}))
        try:
            connection.tls.send(
                b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json'
                b'\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: '
                + to_bytes(str(len(body))) + b'\r\n\r\n' + body)
        except (ssl.SSLError, socket.error, OSError, ValueError) as exc:
            log.debug('refusing %s: %s', connection.address[0], exc)
        log.warning('refused a request from %s: %d requests in progress',
                    connection.address[0], self.max_workers)
        self._close(connection)

    def _take_back(self):
        try:
            os.read(self._wakeup_r, 4096)
        except OSError:
            pass
        with self._lock:
            returned, self._returned = self._returned, []
            self._signalled = False
        for connection in returned:
            if connection.state != _WAITING:
                self._close(connection)
                continue
            self._await_request(connection, register=True)
            if connection.buffer or connection.tls.pending():
                self._receive(connection)

    def _close(self, connection):
        if self._connections.pop(connection.fd, None) is not None and (
                connection.state <= _SENDING):
            try:
                self._poller.unregister(connection.fd)
            except (KeyError, ValueError):
                pass
        self._close_quietly(connection.tls)
        self._close_quietly(connection.sock)  # Python 2: the plain socket shares the descriptor

    @staticmethod
    def _close_quietly(sock):
        try:
            sock.close()
        except Exception:
            pass

    # -- workers
    def _next_request(self):
        """The oldest ready connection whose client address is within its share."""
        for index, connection in enumerate(self._ready):
            if self._busy.get(connection.address[0], 0) < self.address_share:
                del self._ready[index]
                return connection
        return None

    def _worker(self):
        while True:
            with self._lock:
                connection = self._next_request()
                while connection is None:
                    if self._stopping and not self._ready:
                        self._workers -= 1
                        self._work.notify_all()
                        return
                    self._idle_workers += 1
                    self._work.wait()
                    self._idle_workers -= 1
                    connection = self._next_request()
                address = connection.address[0]
                self._busy[address] = self._busy.get(address, 0) + 1
                self._working += 1
            try:
                self._serve(connection)
            finally:
                with self._lock:
                    self._working -= 1
                    count = self._busy[address] - 1
                    if count:
                        self._busy[address] = count
                    else:
                        del self._busy[address]
                    if self._ready:
                        self._work.notify()
                    if self._stopping and not self._working:
                        self._work.notify_all()

    def _serve(self, connection):
        connection.state = _WORKING
        keep = False
        try:
            connection.tls.settimeout(self.idle_timeout)
            keep = connection.handler.serve_request(connection.head)
            if keep:
                connection.tls.setblocking(0)
        except (socket.error, ssl.SSLError, OSError, ValueError) as exc:
            log.debug('connection to %s ended: %s', connection.address[0], exc)
            keep = False
        except Exception:
            log.error('connection from %s failed: %s', connection.address[0],
                      traceback.format_exc())
            keep = False
        connection.head = None
        connection.body = 0
        connection.state = _WAITING if keep and not self._stopping else _WORKING
        with self._lock:
            self._returned.append(connection)
            signal_it = not self._signalled
            self._signalled = True
        if signal_it:
            self._wake()

    def _shut_down(self):
        """Close what waits; running requests get SHUTDOWN_GRACE_SECONDS to finish, then their
        connections are cut and the workers get SHUTDOWN_CUT_SECONDS more to end. The
        interpreter must not exit under a running thread (Python 2 then prints tracebacks
        from its teardown). Returns how many workers are still running."""
        if self._signal is not None:
            log.info('signal %d: stopping (running transfers get %ds)', self._signal,
                     SHUTDOWN_GRACE_SECONDS)
        self.listener.close()
        for connection in list(self._connections.values()):
            if connection.state <= _SENDING:
                self._close(connection)
        deadline = time.time() + SHUTDOWN_GRACE_SECONDS
        cut = False
        with self._lock:
            while self._workers:
                self._work.notify_all()
                if time.time() > deadline:
                    if cut:
                        break
                    log.warning('%d requests still running at shutdown: closing their '
                                'connections', self._working)
                    for connection in list(self._connections.values()):
                        if connection.state == _WORKING:
                            try:
                                connection.tls.shutdown(socket.SHUT_RDWR)
                            except (socket.error, ssl.SSLError, OSError, ValueError):
                                pass
                    cut, deadline = True, time.time() + SHUTDOWN_CUT_SECONDS
                self._work.wait(0.05)
            running = self._workers
            threads = list(self._threads)
        for thread in threads:
            thread.join(0.5 if not running else 0.01)
        self._take_back()
        for connection in list(self._connections.values()):
            if connection.state <= _SENDING:
                self._close(connection)
        if running:
            log.warning('%d worker threads did not end', running)
        return running


def _open_descriptor_count():
    try:
        return len(os.listdir('/proc/self/fd'))
    except OSError:
        return 16


class _ConnectionReader(object):
    """A request body: the bytes the front end already read, then the socket."""

    def __init__(self, connection):
        self.connection = connection

    def read(self, size):
        connection = self.connection
        while len(connection.buffer) < size:
            block = connection.tls.read(65536) if PY2 else connection.tls.recv(65536)
            if not block:
                break
            connection.buffer += block
        data, connection.buffer = connection.buffer[:size], connection.buffer[size:]
        return data


_stream_buffers = threading.local()


def stream_buffer():
    """This thread's buffer for copying files to sockets."""
    buffer = getattr(_stream_buffers, 'buffer', None)
    if buffer is None:
        buffer = _stream_buffers.buffer = bytearray(STREAM_BUFFER_SIZE)
    return buffer


def stream_file(handle, write, start, length, buffer):
    """Copy `length` bytes from `start` of an unbuffered file to `write`, reusing `buffer`."""
    handle.seek(start)
    view = None if PY2 else memoryview(buffer)  # novermin
    while length > 0:
        if view is None:
            block = handle.read(min(len(buffer), length))
            count = len(block)
        else:
            count = handle.readinto(view[:min(len(buffer), length)])
            block = view[:count]
        if not count:
            raise IOError(errno.EIO, 'the snapshot file ended early')
        write(block)
        length -= count


def read_file_range(handle, start, length):
    """`length` bytes from `start` of a file, as one bytes object (the file object's own
    position and buffer are not used)."""
    if os_pread is not None:
        data = os_pread(handle.fileno(), length, start)
    else:
        os.lseek(handle.fileno(), start, os.SEEK_SET)
        data = os.read(handle.fileno(), length)
    if len(data) != length:
        raise IOError(errno.EIO, 'the snapshot file ended early')
    return data


class ExporterRequestHandler(http_server.BaseHTTPRequestHandler):
    """The requests of one connection, one at a time: ApiApplication.respond makes each
    Response, which is written to the TLS socket (or, for the front end's quick answers, to
    memory) and logged. The front end parses the head (parse_request_head), so
    BaseHTTPRequestHandler's own reading and parsing are not used; its names are kept."""

    protocol_version = 'HTTP/1.1'
    server_version = 'ovm_exporter/' + __version__
    sys_version = ''

    def __init__(self, connection, server):
        self.connection = self.request = connection.tls
        self.client_address = connection.address
        self.server = server
        self.reader = _ConnectionReader(connection)

    def serve_request(self, request, out=None):
        """Answer one request; True if the connection stays open for the next. The answer
        goes to the socket, or is appended to the list `out` (a quick answer: small, read
        whole)."""
        started = time.time()
        request.client_address = self.client_address
        request.read = self.reader.read
        request.close = (request.error is not None or not request.keep_alive
                         or self.server.stopping)
        response = None
        sent = 0
        try:
            try:
                if request.error is not None:
                    raise request.error
                request.check_body_framing()
                response = self.server.app.respond(request)
            except (ApiError, ServiceError, StoreError) as exc:
                if not request.body_done:  # the rest of the request is still on the wire
                    request.close = True
                response = Response.error(api_error(exc))
            if out is None:
                sent = self.send(request, response)
            else:
                sent = self.collect(request, response, out)
        except socket.timeout:
            request.close = True
        except (socket.error, ssl.SSLError, IOError, OSError) as exc:
            log.debug('connection to %s ended: %s', self.client_address[0], exc)
            request.close = True
        finally:
            status = 0
            if response is not None:
                response.close()
                status = response.status
            line = access_line(request, status, sent, started)
            if line is None:
                pass
            elif out is None:
                log_lines([line])
            else:  # the front end writes its answers' lines once per turn of its loop
                self.server.access_lines.append(line)
            if request.close and status >= 400 and not request.body_done:
                self._lingering_close()
        return not request.close

    def head_bytes(self, request, response, length):
        lines = ['HTTP/1.1 %d %s' % (response.status, HTTP_REASONS.get(response.status,
                                                                        'Unknown')),
                 'Server: ' + self.server_version, 'Date: ' + http_date()]
        for name, value in response.headers:
            lines.append('%s: %s' % (name, value))
        lines.append('Content-Length: %d' % length)
        if request.close:
            lines.append('Connection: close')
        return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')

    def send(self, request, response):
        """Write `response` to the socket; -> the body bytes sent."""
        length = response.length()
        head = self.head_bytes(request, response, length)
        write = self.connection.sendall
        if request.method == 'HEAD':
            write(head)
            return 0
        if response.file is None:
            write(head + response.body)
            return length
        write(head)
        buffer = stream_buffer()
        for part_head, start, count in response.parts:
            if part_head is not None:
                write(part_head)
            stream_file(response.file, write, start, count, buffer)
            if part_head is not None:
                write(b'\r\n')
        if response.tail:
            write(response.tail)
        return length

    def collect(self, request, response, out):
        """Append `response`, read whole, to the list `out`; -> the body bytes."""
        length = response.length()
        out.append(self.head_bytes(request, response, length))
        if request.method == 'HEAD':
            return 0
        if response.file is None:
            out.append(response.body)
            return length
        for part_head, start, count in response.parts:
            if part_head is not None:
                out.append(part_head)
            out.append(read_file_range(response.file, start, count))
            if part_head is not None:
                out.append(b'\r\n')
        out.append(response.tail)
        return length

    def _lingering_close(self):
        """After an error answer that leaves input unread: half-close, then read and drop what
        the client still sends (bounded in bytes and time). Closing with unread input would
        reset the connection, and the client could lose the answer it has not read yet."""
        deadline = time.time() + LINGER_SECONDS
        budget = LINGER_BYTES
        # TLS is dropped: what is read is discarded unread. Python 2.6's SSLSocket cannot recv
        # once its TLS is shut down, so Python 2 uses the plain socket under it.
        sock = self.connection._sock if PY2 else self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            while budget > 0 and time.time() < deadline:
                sock.settimeout(max(0.01, deadline - time.time()))
                block = sock.recv(65536)
                if not block:
                    break
                budget -= len(block)
        except (socket.error, socket.timeout, ssl.SSLError, IOError, OSError, ValueError):
            pass


def access_line(request, status, sent, started):
    """The access-log line of a request (None if INFO is not logged): the combined log format
    plus the duration. Request fields are escaped (log_field), and tokens in them redacted:
    one request is one line, and no secret reaches the log."""
    if not log.isEnabledFor(logging.INFO):
        return None
    headers = request.headers
    return '%s - %s [%s] "%s" %d %d "%s" "%s" %.3fs' % (
        request.client_address[0], log_field(request.user, 256), access_log_time(started),
        log_field(request.requestline, 1024), status, sent,
        log_field(headers.get('Referer') if headers else None, 1024),
        log_field(headers.get('User-Agent') if headers else None, 256),
        time.time() - started)


def log_lines(lines):
    """Log INFO lines as one record (one write); _LogFormatter prefixes each line."""
    log.info('%s', '\n'.join(lines), extra={'lines': lines})


# Every domain error and its answer: (type, status, title); the first type that fits wins.
ERROR_STATUSES = (
    (NotFound, 404, 'Not Found'),
    (InvalidRequest, 400, 'Bad Request'),
    (WrongVm, 409, 'Conflict'),
    (RangeNotSatisfiable, 416, 'Range Not Satisfiable'),
    (NoSpace, 507, 'Insufficient Storage'),
    (RepositoryUnavailable, 503, 'Service Unavailable'),
    (TokenRefused, 401, 'Authentication failed'),
    (LoginRefused, 401, 'Not Authorized'),
    (TooManyLogins, 429, 'Too Many Requests'),
    (ManagerUnavailable, 502, 'Bad Gateway'),
    (StoreBusyError, 503, 'Service Unavailable'),
    (StoreFullError, 507, 'Insufficient Storage'),
    (ServiceError, 500, 'Internal Server Error'),
    (StoreError, 500, 'Internal Server Error'),
)


def api_error(exc):
    """A domain error (ServiceError, StoreError) as the ApiError that answers it; an ApiError
    as it is. A state database failure is logged here, once, without a trace."""
    if isinstance(exc, ApiError):
        return exc
    for kind, status, title in ERROR_STATUSES:
        if isinstance(exc, kind):
            break
    if not isinstance(exc, StoreError):
        return ApiError(status, title, exc.details, exc.headers)
    if isinstance(exc, StoreBusyError):
        log.warning('%s', exc)
        return ApiError(status, title, str(exc),
                        {'Retry-After': '%d' % math.ceil(STORE_BUSY_TIMEOUT)})
    log.error('%s', exc)
    return ApiError(status, title, str(exc))


def warning_header(problems):
    """RFC 7234 Warning 199 for an answer served without the state database."""
    text = '; '.join(problems).replace('"', "'").replace('\\', '/')
    text = ''.join(c for c in text if ' ' <= c <= '~')[:512]
    return [('Warning', '199 ovm_exporter "%s"' % text)] if problems else []


def disk_validators(handle, size):
    """(Last-Modified, ETag) of a snapshot file: snapshot files never change, so inode, size
    and mtime make a strong validator."""
    status = os.fstat(handle.fileno())
    return (http_date(status.st_mtime),
            '"%x-%x-%x"' % (status.st_ino, size, int(status.st_mtime * 1000000)))


class ApiApplication(object):
    """Routes each Request to the snapshot service or the authenticator and returns the
    Response; domain errors and ApiError go up to the connection layer."""

    def __init__(self, service, authenticator):
        self.service = service
        self.authenticator = authenticator
        # The front end's open disk files, for its quick answers only: (vm, snapshot, disk)
        # -> (file, size, validators), while the service's snapshots stay as they were.
        self._quick_files = {}
        self._quick_generation = None
        self._routes_seen = {}  # request target -> route(): clients ask for one URL often
        vm, snapshot = ('api', 'v1', 'vms', None), ('snapshots', None)
        # The route table: path pattern (None: an id), the handler of each method (in the
        # order of the Allow header), whether a token is needed.
        self.routes = [
            (('api', 'v1', 'auth', 'login'), (('POST', self.on_post_login),), False),
            (('api', 'v1', 'vms'), (('GET', self.on_get_vms),), True),
            (vm, (('GET', self.on_get_vm),), True),
            (vm + ('snapshots',), (('GET', self.on_get_snapshots),
                                   ('POST', self.on_post_snapshots),
                                   ('DELETE', self.on_delete_snapshots)), True),
            (vm + snapshot, (('GET', self.on_get_snapshot),
                             ('DELETE', self.on_delete_snapshot)), True),
            (vm + snapshot + ('disks', None), (('GET', self.on_get_disk),
                                               ('HEAD', self.on_get_disk)), True),
            (vm + snapshot + ('disks', None, 'checksum'), (('GET', self.on_get_checksum),),
             True),
        ]

    @staticmethod
    def split_path(raw_path):
        """URL path -> decoded segments, or None when a segment is not a plain name."""
        segments = raw_path.split('/')
        if segments[:1] != ['']:
            return None
        segments = segments[1:]
        if len(segments) > 1 and segments[-1] == '':
            segments = segments[:-1]
        decoded = []
        quoted = '%' in raw_path
        for segment in segments:
            value = url_unquote(segment) if quoted else segment
            if '/' in value or '\x00' in value or value in ('', '.', '..') \
                    or len(value) > 255:
                return None
            decoded.append(value)
        return decoded

    def route(self, request):
        """-> (urlsplit, (handlers: (method, function) pairs, needs_auth, parameters) or
        None), looked up once per request."""
        if request.route is None:
            request.route = self._routes_seen.get(request.target)
        if request.route is None:
            url = urlsplit(request.target)
            segments = self.split_path(url.path)
            request.route = (url, self._match(segments) if segments is not None else None)
            if len(self._routes_seen) >= ROUTES_SEEN:
                self._routes_seen = {}
            self._routes_seen[request.target] = request.route
        return request.route

    def _match(self, segments):
        for pattern, handlers, needs_auth in self.routes:
            if len(pattern) != len(segments):
                continue
            params = []
            for expected, actual in zip(pattern, segments):
                if expected is None:
                    if not ID_RE.match(actual):
                        break
                    params.append(actual)
                elif expected != actual:
                    break
            else:
                return handlers, needs_auth, params
        return None

    def is_quick(self, request):
        """A request the front end may answer itself without blocking: a GET or HEAD of at
        most QUICK_RANGE_LIMIT bytes of a disk of a snapshot the service's index holds (no
        state database, no Manager, no body)."""
        if (request.method not in ('GET', 'HEAD') or 'Content-Length' in request.headers
                or 'Transfer-Encoding' in request.headers):
            return False
        ranges = request.headers.get_all('Range')
        if not ranges or len(ranges) != 1 or quick_range_bytes(ranges[0]) is None:
            return False
        found = self.route(request)[1]
        request.quick = (found is not None and found[0][0][1] == self.on_get_disk
                         and self.service.has_ready_record(found[2][0], found[2][1]))
        return request.quick

    def respond(self, request):
        url, found = self.route(request)
        if found is None:
            raise not_found('Resource not found')
        handlers, needs_auth, params = found
        handler = dict(handlers).get(request.method)
        if handler is None:
            raise ApiError(405, 'Method Not Allowed', '%s does not support %s'
                           % (url.path, request.method),
                           {'Allow': ', '.join([method for method, _ in handlers])})
        if needs_auth:
            request.user = self.authenticator.verify_request(
                request.headers.get('Authorization'))
            request.read_body()  # no route but login takes a body; read and drop it
        query = parse_qs(url.query, keep_blank_values=True) if url.query else {}
        return handler(request, params, query)

    # -- authentication
    def on_post_login(self, request, params, query):
        body = request.read_body()
        try:
            document = json_loads_bounded(body.decode('utf-8'))
        except (ValueError, UnicodeDecodeError):
            raise bad_request('the body must be JSON: {"username": "...", "password": "..."}')
        if not isinstance(document, dict):
            raise bad_request('the body must be a JSON object with username and password')
        username, password = document.get('username'), document.get('password')
        if not isinstance(username, string_types) or not isinstance(password, string_types) \
                or not username:
            raise bad_request('username and password are required strings')
        if _LONE_SURROGATE_RE.search(username) or _LONE_SURROGATE_RE.search(password):
            raise bad_request('username and password must be valid Unicode (a \\u escape '
                              'of half a surrogate pair is not)')
        token = self.authenticator.login(username, password, request.client_address[0])
        request.user = username
        return Response.json(200, {'token': token})

    # -- virtual machines
    def on_get_vms(self, request, params, query):
        problems = []
        vms = self.service.list_vms(problems)
        return Response.json(200, vms, warning_header(problems))

    def on_get_vm(self, request, params, query):
        problems = []
        vm = self.service.get_vm(params[0], problems)
        return Response.json(200, vm, warning_header(problems))

    # -- snapshots
    @staticmethod
    def _squash(query):
        values = query.get('squashChunks')
        return parse_go_bool(values[-1], 'squashChunks') if values else True

    def on_get_snapshots(self, request, params, query):
        return Response.json(200, self.service.list_snapshots(params[0], self._squash(query)))

    def on_post_snapshots(self, request, params, query):
        return Response.json(200, self.service.create_snapshot(params[0]))

    def on_delete_snapshots(self, request, params, query):
        self.service.delete_all(params[0])
        return Response.json(200, {'deleted': True})

    def on_get_snapshot(self, request, params, query):
        compare = query.get('compareTo')
        compare_to = compare[-1] if compare and compare[-1] else None
        return Response.json(200, self.service.get_snapshot(
            params[0], params[1], squash=self._squash(query), compare_to=compare_to))

    def on_delete_snapshot(self, request, params, query):
        self.service.delete_snapshot(params[0], params[1])
        return Response.json(200, {'deleted': True})

    # -- disk data
    def on_get_disk(self, request, params, query):
        if request.quick:
            handle, size, validators = self._quick_file(params)
            return self._disk_response(request, handle, size, validators, False)
        handle, size = self.service.open_disk(params[0], params[1], params[2])
        try:
            return self._disk_response(request, handle, size, disk_validators(handle, size))
        except BaseException:
            handle.close()
            raise

    def _quick_file(self, params):
        """open_disk, kept open for the next quick answers while the service's snapshots do
        not change (see close_stale_files)."""
        self.close_stale_files()
        key = tuple(params)
        cached = self._quick_files.get(key)
        if cached is None:
            handle, size = self.service.open_disk(params[0], params[1], params[2])
            if len(self._quick_files) >= QUICK_FILES:
                self._close_quick_files()
            cached = self._quick_files[key] = (handle, size, disk_validators(handle, size))
        return cached

    def close_stale_files(self):
        """Close the quick answers' files once a snapshot was made or deleted (the front end
        calls this between requests too, so that a deleted file is not kept open)."""
        generation = self.service.generation
        if generation != self._quick_generation:
            self._close_quick_files()
            self._quick_generation = generation

    def _close_quick_files(self):
        files, self._quick_files = self._quick_files, {}
        for handle, _, _ in files.values():
            handle.close()

    def on_get_checksum(self, request, params, query):
        return Response.json(200, self.service.disk_checksum(
            params[0], params[1], params[2], start=self._number(query, 'start') or 0,
            length=self._number(query, 'length'), block_size=self._number(query, 'block_size')))

    @staticmethod
    def _number(query, name):
        values = query.get(name)
        if not values:
            return None
        if len(values[-1]) > 19 or not DECIMAL_RE.match(values[-1]):
            raise bad_request('%s must be a plain decimal number (at most 19 digits), not %r'
                              % (name, values[-1][:40]))
        return int(values[-1])

    @staticmethod
    def _if_range_holds(values, etag, last_modified):
        """RFC 9110 13.1.5: an entity tag matches only when strong and equal, a date only
        when equal to Last-Modified; a weak tag (or a repeated If-Range) never matches."""
        if not values:
            return True
        value = values[0].strip(' \t')
        return len(values) == 1 and value == (etag if value.startswith('"') else last_modified)

    def _disk_response(self, request, handle, size, validators, closes_file=True):
        last_modified, etag = validators
        headers = [('Content-Type', 'application/octet-stream'), ('Accept-Ranges', 'bytes'),
                   ('Last-Modified', last_modified), ('ETag', etag)]
        range_headers = request.headers.get_all('Range', [])
        if not range_headers or not self._if_range_holds(
                request.headers.get_all('If-Range', []), etag, last_modified):
            return Response(200, headers, file=handle, parts=[(None, 0, size)],
                            closes_file=closes_file)
        try:
            if len(range_headers) > 1:
                raise RangeNotSatisfiable('send one Range header')
            ranges = parse_range_header(range_headers[0], size)
        except RangeNotSatisfiable as exc:
            raise RangeNotSatisfiable(exc.details, {'Content-Range': 'bytes */%d' % size})
        if len(ranges) == 1:
            first, last = ranges[0]
            headers.append(('Content-Range', 'bytes %d-%d/%d' % (first, last, size)))
            return Response(206, headers, file=handle, parts=[(None, first, last - first + 1)],
                            closes_file=closes_file)
        boundary = binascii.hexlify(os.urandom(12)).decode('ascii')
        parts = []
        for first, last in ranges:
            head = ('--%s\r\nContent-Type: application/octet-stream\r\n'
                    'Content-Range: bytes %d-%d/%d\r\n\r\n'
                    % (boundary, first, last, size)).encode('ascii')
            parts.append((head, first, last - first + 1))
        headers[0] = ('Content-Type', 'multipart/byteranges; boundary=' + boundary)
        return Response(206, headers, file=handle, parts=parts,
                        tail=('--%s--\r\n' % boundary).encode('ascii'), closes_file=closes_file)

# -------------------------------------------------------------------------------- client ---
#
# A small client for the API, used by the `client` command, the demo and the tests. It keeps
# one keep-alive connection and rebuilds disk images from chunks: the first snapshot's chunks
# make a full image, a later snapshot's compareTo chunks turn that image into the later one.

DOWNLOAD_PIECE = 64 << 20
VERIFY_BLOCK_SIZE = 1 << 20
CONTENT_RANGE_RE = re.compile(r'bytes ([0-9]+)-([0-9]+)/')
BATCH_RANGES = 256           # small chunks go in multi-range requests of up to this many
BATCH_BYTES = 8 << 20        # ... and this many bytes
DOWNLOAD_CONNECTIONS = 4     # requests in flight at once


class ClientError(Exception):
    def __init__(self, status, message):
        Exception.__init__(self, '%s: %s' % (status, message))
        self.status = status


# Where Python 2.6 finds trusted CAs when no --cacert is given (it has no load_default_certs):
# Oracle Linux / RHEL, then Debian / Ubuntu.
CLIENT_CA_BUNDLES = ('/etc/pki/tls/certs/ca-bundle.crt', '/etc/ssl/certs/ca-certificates.crt')


def _ip_address_bytes(text):
    """The packed address of an IPv4/IPv6 literal, or None for a host name."""
    for family in (socket.AF_INET, getattr(socket, 'AF_INET6', None)):
        if family is None:
            continue
        try:
            return socket.inet_pton(family, text.strip('[]'))
        except (socket.error, ValueError, UnicodeError):
            pass
    return None


def _dns_name_matches(pattern, host):
    """RFC 6125 rules: case-insensitive, a wildcard only as the whole left-most label."""
    pattern, host = pattern.lower().rstrip('.'), host.lower().rstrip('.')
    if pattern.startswith('*.'):
        head, _, rest = host.partition('.')
        return bool(head) and rest == pattern[2:] and '.' in pattern[2:]
    return pattern == host


def certificate_matches_host(cert, host):
    """True when `cert` (a getpeercert() dict) names `host`: an IP literal must be an IP
    subjectAltName; a name must match a DNS subjectAltName, or the common name where the
    certificate has no DNS names. Python 2.6 has no ssl.match_hostname."""
    alt_names = cert.get('subjectAltName', ())
    address = _ip_address_bytes(host)
    if address is not None:
        return any(kind == 'IP Address' and _ip_address_bytes(value.strip()) == address
                   for kind, value in alt_names)
    dns_names = [value for kind, value in alt_names if kind == 'DNS']
    if not dns_names:
        for rdn in cert.get('subject', ()):
            dns_names += [value for key, value in rdn if key == 'commonName']
    return any(_dns_name_matches(name, host) for name in dns_names)


class _VerifiedHTTPSConnection(http_client.HTTPSConnection):  # novm (httplib on 2)
    """The client's HTTPS connection: the chain is checked by client_tls against ca_file (the
    system's CAs without one); the name by certificate_matches_host (2.6 has no name check and
    2.7's cannot match IP addresses), before any byte is sent. verify False: no check at all
    (--insecure)."""

    def __init__(self, host, port, timeout, verify, ca_file=None):
        http_client.HTTPSConnection.__init__(self, host, port, timeout=timeout)  # novm
        self._ovm_verify, self._ovm_ca_file = verify, ca_file

    def connect(self):
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            tls = client_tls(sock, self.host, self._ovm_ca_file, self._ovm_verify)
        except BaseException:
            sock.close()
            raise
        if self._ovm_verify and not certificate_matches_host(tls.getpeercert(), self.host):
            tls.close()
            raise ssl.SSLError('the certificate of %s:%d does not name %s' % (
                self.host, self.port, self.host))
        self.sock = tls


class ExporterClient(object):
    def __init__(self, base_url, ca_file=None, insecure=False, timeout=120.0):
        parts = urlsplit(base_url)
        if parts.scheme != 'https':
            raise ValueError('the exporter speaks HTTPS only: %s' % base_url)
        self.host, self.port = parts.hostname, parts.port or 5544
        self.prefix = parts.path.rstrip('/')
        if not self.prefix.endswith('/api/v1'):
            self.prefix += '/api/v1'
        self.ca_file, self.insecure, self.timeout = ca_file, insecure, timeout
        self.token = None
        self._connection = None

    def _connect(self):
        verify = not self.insecure
        ca_file = self.ca_file
        if verify and not ca_file and not HAVE_SSLCONTEXT:  # 2.6 has no load_default_certs
            bundles = [path for path in CLIENT_CA_BUNDLES if os.path.isfile(path)]
            if not bundles:
                raise ClientError(0, 'no CA bundle at %s: give --cacert (or --insecure)'
                                  % ' or '.join(CLIENT_CA_BUNDLES))
            ca_file = bundles[0]
        return _VerifiedHTTPSConnection(self.host, self.port, self.timeout, verify, ca_file)

    def request(self, method, path, body=None, headers=None):
        """-> (status, headers dict with lower-case names, body bytes)."""
        all_headers = {'Accept': 'application/json'}
        if self.token:
            all_headers['Authorization'] = 'Bearer ' + self.token
        all_headers.update(headers or {})
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = self._connect()
            try:
                self._connection.request(method, self.prefix + path, body, all_headers)
                response = self._connection.getresponse()
                data = response.read()
            except (http_client.HTTPException, socket.error, ssl.SSLError):
                self.close()
                if attempt == 2 or method not in ('GET', 'HEAD', 'DELETE'):
                    raise
                continue
            if response.getheader('connection', '').lower() == 'close':
                self.close()
            return (response.status, dict((k.lower(), v) for k, v in response.getheaders()),
                    data)

    def close(self):
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def call(self, method, path, body=None, expect=(200,)):
        status, headers, data = self.request(method, path, body)
        if status not in expect:
            try:
                message = json.loads(data.decode('utf-8')).get('details')
            except (ValueError, AttributeError, UnicodeDecodeError):
                message = data[:200]
            raise ClientError(status, message)
        return json.loads(data.decode('utf-8')) if data else None

    def login(self, username, password):
        body = json_dumps({'username': username, 'password': password})
        self.token = self.call('POST', '/auth/login', body)['token']
        return self.token

    def vms(self):
        return self.call('GET', '/vms')

    def create_snapshot(self, vm_id):
        return self.call('POST', '/vms/%s/snapshots' % vm_id)

    def snapshot(self, vm_id, snapshot_id, compare_to=None, squash=True):
        query = '?squashChunks=%s' % ('true' if squash else 'false')
        if compare_to:
            query += '&compareTo=' + compare_to
        return self.call('GET', '/vms/%s/snapshots/%s%s' % (vm_id, snapshot_id, query))

    def delete_snapshot(self, vm_id, snapshot_id):
        return self.call('DELETE', '/vms/%s/snapshots/%s' % (vm_id, snapshot_id))

    def disk_size(self, vm_id, snapshot_id, disk_name):
        status, headers, _ = self.request(
            'HEAD', '/vms/%s/snapshots/%s/disks/%s' % (vm_id, snapshot_id, disk_name))
        if status != 200:
            raise ClientError(status, 'HEAD of disk %s failed' % disk_name)
        return int(headers['content-length'])

    def read_range(self, vm_id, snapshot_id, disk_name, start, length):
        status, headers, data = self.request(
            'GET', '/vms/%s/snapshots/%s/disks/%s' % (vm_id, snapshot_id, disk_name),
            headers={'Range': 'bytes=%d-%d' % (start, start + length - 1)})
        expected = 'bytes %d-%d/' % (start, start + len(data) - 1)
        if status != 206 or not headers.get('content-range', '').startswith(expected) \
                or len(data) != length:
            raise ClientError(status, 'range %d+%d of %s came back wrong' %
                              (start, length, disk_name))
        return data

    def read_ranges(self, vm_id, snapshot_id, disk_name, ranges):
        """Several (start, length) ranges in one request -> [(start, bytes)] covering exactly
        them (the server may merge touching ranges into one part)."""
        status, headers, data = self.request(
            'GET', '/vms/%s/snapshots/%s/disks/%s' % (vm_id, snapshot_id, disk_name),
            headers={'Range': 'bytes=' + ','.join(['%d-%d' % (start, start + length - 1)
                                                   for start, length in ranges])})
        if status != 206:
            raise ClientError(status, '%d ranges of %s came back with status %d'
                              % (len(ranges), disk_name, status))
        kind = headers.get('content-type', '')
        if kind.startswith('multipart/byteranges'):
            parts = _multipart_ranges(data, kind.partition('boundary=')[2])
        else:
            parts = [(_content_range_start(headers.get('content-range', '')), data)]
        wanted = sorted((start, start + length) for start, length in ranges)
        got = sorted((start, start + len(block)) for start, block in parts)
        if _merge_spans(wanted) != _merge_spans(got):
            raise ClientError(status, '%d ranges of %s came back wrong' % (len(ranges),
                                                                           disk_name))
        return parts

    def sync_disk(self, vm_id, snapshot_id, disk_name, image_path, compare_to=None,
                  connections=DOWNLOAD_CONNECTIONS, progress=None):
        """Make `image_path` equal to the snapshot's disk. Without compare_to the image is
        built from scratch; with it, the image must hold the compare_to snapshot's disk.
        Small chunks travel in multi-range requests, over `connections` connections at once;
        progress(done, total) is called as bytes arrive. Returns the bytes downloaded."""
        snapshot = self.snapshot(vm_id, snapshot_id, compare_to=compare_to)
        disks = [d for d in snapshot['disks'] if d['name'] == disk_name]
        if not disks:
            raise ClientError(404, 'snapshot %s has no disk %s' % (snapshot_id, disk_name))
        size = self.disk_size(vm_id, snapshot_id, disk_name)
        flags = os.O_RDWR | os.O_CREAT | (0 if compare_to else os.O_TRUNC)
        fd = os.open(image_path, flags, 0o600)
        try:
            os.ftruncate(fd, size)
            pieces, zeros = [], []
            for chunk in disks[0]['chunks']:
                start, end = chunk['start'], min(chunk['start'] + chunk['length'], size)
                while start < end:
                    piece = min(DOWNLOAD_PIECE, end - start)
                    (zeros if chunk.get('zero') else pieces).append((start, piece))
                    start += piece
            for start, piece in zeros:
                _write_at(fd, start, b'\0' * piece)
        finally:
            os.close(fd)
        batches = _download_batches(pieces)
        total = sum([piece for _, piece in pieces])
        state = {'done': 0, 'error': None}
        lock = threading.Lock()

        def work(client):
            out = os.open(image_path, os.O_WRONLY)
            try:
                while True:
                    with lock:
                        if not batches or state['error'] is not None:
                            return
                        batch = batches.pop(0)
                    for start, data in client.read_ranges(vm_id, snapshot_id, disk_name,
                                                          batch):
                        _write_at(out, start, data)
                    with lock:
                        state['done'] += sum([piece for _, piece in batch])
                        if progress is not None:
                            progress(state['done'], total)
            except Exception as exc:  # handed to the caller's thread
                with lock:
                    state['error'] = state['error'] or exc
            finally:
                os.close(out)
                if client is not self:
                    client.close()
        helpers = []
        for _ in range(max(0, min(connections, len(batches)) - 1)):
            helper = ExporterClient('https://%s:%d%s' % (self.host, self.port, self.prefix),
                                    self.ca_file, self.insecure, self.timeout)
            helper.token = self.token
            thread = threading.Thread(target=work, args=(helper,))
            thread.daemon = True
            thread.start()
            helpers.append(thread)
        work(self)
        for thread in helpers:
            thread.join()
        if state['error'] is not None:
            raise state['error']
        return total

    def checksum(self, vm_id, snapshot_id, disk_name, start=None, length=None,
                 block_size=None):
        query = '&'.join('%s=%d' % (name, value) for name, value in (
            ('start', start), ('length', length), ('block_size', block_size))
            if value is not None)
        return self.call('GET', '/vms/%s/snapshots/%s/disks/%s/checksum%s' % (
            vm_id, snapshot_id, disk_name, '?' + query if query else ''))

    def verify_disk(self, vm_id, snapshot_id, disk_name, image_path,
                    block_size=VERIFY_BLOCK_SIZE):
        """Check `image_path` against the server's sha256 of the disk; where they differ,
        find the blocks that differ, download them again, and check again. Returns the
        bytes downloaded again (0: the image was right); raises ClientError when the image
        still differs."""
        size = self.disk_size(vm_id, snapshot_id, disk_name)
        remote = self.checksum(vm_id, snapshot_id, disk_name)['checksum'] if size else None
        if _image_checksum(image_path, size) == remote:
            return 0
        repaired = 0
        fetching = False  # an OSError while fetching is the connection's, not the image's
        try:
            with open(image_path, 'r+b', 0) as image:  # unbuffered: blocks are rewritten by fd
                if os.fstat(image.fileno()).st_size != size:
                    image.truncate(size)
                span = block_size * CHECKSUM_MAX_BLOCKS
                for offset in range(0, size, span):
                    length = min(span, size - offset)
                    fetching = True
                    theirs = self.checksum(vm_id, snapshot_id, disk_name, offset, length,
                                           block_size)['blocks']
                    fetching = False
                    ours = range_checksums(image, None, size, offset, length, block_size)[1]
                    for index in range(len(ours)):
                        if index < len(theirs) and theirs[index] == ours[index]:
                            continue
                        start = offset + index * block_size
                        count = min(block_size, size - start)
                        fetching = True
                        data = self.read_range(vm_id, snapshot_id, disk_name, start, count)
                        fetching = False
                        _write_at(image.fileno(), start, data)
                        repaired += count
        except (IOError, OSError) as exc:
            if fetching:
                raise
            raise ClientError('mismatch', 'image %s differs from disk %s of snapshot %s and '
                              'cannot be repaired: %s' % (image_path, disk_name, snapshot_id,
                                                          exc))
        if _image_checksum(image_path, size) != remote:
            raise ClientError('mismatch', 'image %s still differs from disk %s of snapshot %s '
                              'after %d bytes were downloaded again'
                              % (image_path, disk_name, snapshot_id, repaired))
        return repaired


def _image_checksum(path, size):
    """sha256 of a local image (None when its size is not `size`; no size: None)."""
    with open(path, 'rb', 0) as image:
        if not size or os.fstat(image.fileno()).st_size != size:
            return None
        return range_checksums(image, None, size, 0, size)[0]


def _download_batches(pieces):
    """(start, length) pieces -> lists of them for one request each: a big piece alone,
    small ones together up to BATCH_RANGES ranges and BATCH_BYTES bytes."""
    batches, batch, size = [], [], 0
    for start, length in pieces:
        if batch and (len(batch) >= BATCH_RANGES or size + length > BATCH_BYTES):
            batches.append(batch)
            batch, size = [], 0
        batch.append((start, length))
        size += length
    if batch:
        batches.append(batch)
    return batches


def _content_range_start(value):
    match = CONTENT_RANGE_RE.match(value)
    if match is None:
        raise ClientError(206, 'no Content-Range in the answer: %r' % value[:80])
    return int(match.group(1))


def _multipart_ranges(data, boundary):
    """A multipart/byteranges body -> [(start, bytes)]."""
    parts = []
    delimiter = b'--' + to_bytes(boundary.strip('"'))
    position = 0
    while True:
        position = data.find(delimiter, position)
        after = position + len(delimiter)
        if position < 0 or data[after:after + 2] == b'--':
            return parts
        head_end = data.find(b'\r\n\r\n', position)
        if head_end < 0:
            raise ClientError(206, 'a multipart answer ended early')
        start = end = None
        for line in data[position:head_end].decode('latin-1').split('\r\n'):
            name, _, value = line.partition(':')
            if name.strip().lower() == 'content-range':
                match = CONTENT_RANGE_RE.match(value.strip())
                if match:
                    start, end = int(match.group(1)), int(match.group(2))
        if start is None:
            raise ClientError(206, 'a part of a multipart answer has no Content-Range')
        body = head_end + 4
        parts.append((start, data[body:body + end - start + 1]))
        position = body + end - start + 1


def _merge_spans(spans):
    merged = []
    for first, last in spans:
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _write_at(fd, offset, data):
    os.lseek(fd, offset, os.SEEK_SET)
    while data:
        written = os.write(fd, data)
        data = data[written:]

# ---------------------------------------------------------------------- command line ---

class _LogFormatter(logging.Formatter):
    """'%(asctime)s %(levelname)s %(message)s' with the time formatted once a second; each
    line of a log_lines record gets the prefix."""

    def __init__(self):
        logging.Formatter.__init__(self, '%(asctime)s %(levelname)s %(message)s')
        self._second = (None, '')

    def format(self, record):
        lines = getattr(record, 'lines', None)
        if lines is None:
            return logging.Formatter.format(self, record)
        prefix = '%s %s ' % (self.formatTime(record), record.levelname)
        return prefix + ('\n' + prefix).join(lines)

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, time.strftime('%Y-%m-%d %H:%M:%S',
                                                  time.localtime(second)))
        return '%s,%03d' % (self._second[1], record.msecs)


def setup_logging(config, debug=False):
    level = logging.DEBUG if debug else getattr(logging, config.log_level.upper())
    # One line a request: no caller, thread or process lookups that no line shows.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = 0
    if config.log_file:
        handler = logging.handlers.RotatingFileHandler(
            config.log_file, maxBytes=50 * 1024 * 1024, backupCount=5)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def manager_endpoint_resolver(config):
    """ovm_endpoint, or https://<manager_ip from the ovs-agent server database>:7002."""
    def resolve():
        if config.ovm_endpoint:
            return config.ovm_endpoint
        address = manager_ip_from_server_db(read_ovs_agent_db, config.ovs_agent_db_dir)
        if not address:
            return None
        if ':' in address and not address.startswith('['):
            address = '[%s]' % address
        return 'https://%s:%d' % (address, MANAGER_DEFAULT_PORT)
    return resolve


def build_inventory(config):
    def probe(directory):
        folder = SnapshotFolders.base(directory)
        supported, reason = clone_supported(folder, create=os.path.isdir(directory))
        if not supported and config.demo:
            return True, 'demo: %s; snapshots will be sparse copies' % reason
        return supported, reason

    def check_mounts(repos):
        # the demo's repositories are plain folders
        return repository_problems(repos, plain_folder_ok=config.demo)
    loader = RepositoryDbLoader(read_ovs_agent_db, config.ovs_agent_db_dir, config.repository)
    return HostInventory(loader, sniff_ovsmeta, probe, check_mounts=check_mounts)


def build_application(config):
    """-> (ApiApplication, SnapshotService). Raises StoreError."""
    inventory = build_inventory(config)
    store = SnapshotStore(config.db_file)
    service = SnapshotService(config, inventory, store)
    authenticator = Authenticator(config, manager_endpoint_resolver(config))
    return ApiApplication(service, authenticator), service


def write_pid_file(path):
    with open(path, 'w') as handle:
        handle.write('%d\n' % os.getpid())


def raise_file_limit():
    """The soft descriptor limit up to the hard one: waiting connections cost a descriptor
    each (the front end closes the oldest idle ones when they run short)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def serve(config, pid_file=None, ready=None):
    """Run the service until SIGTERM/SIGINT. `ready(server)` is called once listening.
    Returns how many connection threads did not end."""
    app, service = build_application(config)
    service.cut.unpause_leftovers()
    summary = reconcile(service)
    if any(summary.values()):
        log.warning('start-up recovery: %s', json_dumps(summary))
    raise_file_limit()
    server = ExporterServer(config, app, make_server_tls(config))

    def stop(signum, frame):
        server.stop(signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if pid_file:
        write_pid_file(pid_file)
    try:
        log.info('ovm_exporter %s serving on https://%s:%d', __version__,
                 server.address[0], server.address[1])
        if config.log_file:  # say where to look, on the terminal or the service's output
            sys.stderr.write('ovm_exporter %s serving on https://%s:%d; log: %s\n' % (
                __version__, server.address[0], server.address[1], config.log_file))
            sys.stderr.flush()
        if ready:
            ready(server)
        running = server.serve_forever()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # stopping already: a repeated signal
            signal.signal(signum, signal.SIG_IGN)       # must not kill the exit half-way
        service.store.close()
        if pid_file:
            try:
                os.unlink(pid_file)
            except OSError:
                pass
    log.info('stopped')
    return running


def cli_error(message, status=2):
    sys.stderr.write('ovm_exporter: error: %s\n' % message)
    return status


def preflight(config, need_tls=True):
    """The start-up checks that read the host: the state database, the Manager CA and the
    TLS files (loaded as the server will). Raises ConfigError naming the key."""
    def bad_key(key, what):
        raise ConfigError('%s: key %r: %s' % (config.source, key, what))

    try:
        SnapshotStore.check_is_sqlite(config.db_file)
    except StoreError as exc:
        bad_key('db_file', str(exc))
    if config.ovm_ca_certificate and not os.path.isfile(config.ovm_ca_certificate):
        bad_key('ovm_ca_certificate', 'file %s does not exist' % config.ovm_ca_certificate)
    if not need_tls:
        return
    for key in ('api.tls.certificate', 'api.tls.key'):
        path = config.values[key]
        if not path:
            bad_key(key, 'is required (the service speaks HTTPS only)')
        if not os.path.isfile(path):
            bad_key(key, 'file %s does not exist' % path)
    if config.api_tls_require_client_certificate and not config.api_tls_ca_certificate:
        bad_key('api.tls.ca_certificate', 'is required when require_client_certificate = true')
    try:
        make_server_tls(config)
    except TlsSetupError as exc:
        bad_key(exc.key, str(exc))
    except (ssl.SSLError, IOError, OSError, ValueError) as exc:
        bad_key('api.tls', 'cannot load certificate/key: %s' % exc)


def load_checked_config(path, need_tls=True):
    config = load_config(path)
    problems = validate_config(config)
    preflight(config, need_tls)
    for problem in problems:
        log.warning('%s', problem)
    return config


def command_serve(options, args):
    try:
        config = load_checked_config(options.config)
    except ConfigError as exc:
        return cli_error(str(exc))
    setup_logging(config, options.debug)
    try:
        running = serve(config, options.pid_file)
    except (StoreError, socket.error, OSError) as exc:
        log.error('%s', exc)
        return cli_error(str(exc), 1)
    if running:  # stuck connection threads: exit without the interpreter's teardown
        logging.shutdown()
        os._exit(0)
    return 0


def command_check_config(options, args):
    try:
        config = load_checked_config(options.config)
    except ConfigError as exc:
        return cli_error(str(exc))
    print('# %s is valid; effective configuration (secrets hidden):' % options.config)
    for line in config.describe():
        print(line)
    return 0


def command_vms(options, args):
    if os.path.exists(options.config) or options.config != DEFAULT_CONFIG_PATH:
        try:
            config = load_checked_config(options.config, need_tls=False)
        except ConfigError as exc:
            return cli_error(str(exc))
    else:
        config = default_config()
    inventory = build_inventory(config)
    try:
        vms = inventory.list_vms()
    except (BerkeleyDBError, IOError, OSError) as exc:
        return cli_error('cannot list repositories: %s' % exc, 1)
    if options.json:
        print(json.dumps([vm.to_json() for vm in vms], indent=2, sort_keys=True))
    else:
        write_text(sys.stdout, format_vm_table(vms) + u'\n')
    return 0


def write_text(stream, text):
    """Write unicode text to a standard stream in its encoding, UTF-8 where it has none (a
    pipe on Python 2: print would raise UnicodeEncodeError for a non-ASCII VM name); what
    the encoding cannot hold becomes '?'."""
    data = text.encode(getattr(stream, 'encoding', None) or 'utf-8', 'replace')
    target = getattr(stream, 'buffer', None)  # Python 3: the bytes under the text stream
    if target is None:
        target = stream
    else:
        stream.flush()
    target.write(data)
    target.flush()


COMMANDS = ('serve', 'vms', 'check-config', 'demo', 'client')


def parse_command_line(argv):
    parser = optparse.OptionParser(
        usage='%prog [serve|vms|check-config|demo|client] [options]',
        version='ovm_exporter ' + __version__,
        description='Disk snapshots and incremental exports for Oracle VM.')
    parser.add_option('-c', '--config', default=DEFAULT_CONFIG_PATH,
                      help='configuration file [default: %default]')
    parser.add_option('--pid-file', help='serve: write the process id here')
    parser.add_option('--json', action='store_true', help='vms: print JSON')
    parser.add_option('--debug', action='store_true', help='log debug messages')
    parser.add_option('--port', type='int', default=5544, help='demo: port [default: %default]')
    parser.add_option('--url', help='client: https://host:5544')
    parser.add_option('--user', default='admin', help='client: user name (password from '
                      'OVM_EXPORTER_PASSWORD or a prompt)')
    parser.add_option('--cacert', help='client: CA certificate of the exporter')
    parser.add_option('--insecure', action='store_true', help='client: do not verify TLS')
    parser.add_option('--compare-to', help='client download: older snapshot already in IMAGE')
    parser.add_option('--verify', action='store_true', help='client download: check the image '
                      "against the server's sha256 and download differing blocks again")
    options, args = parser.parse_args(argv)
    command = args.pop(0) if args else 'serve'
    if command not in COMMANDS:
        parser.error('unknown command %r; choose one of %s' % (command, ', '.join(COMMANDS)))
    return command, options, args


def main(argv=None):
    command, options, args = parse_command_line(sys.argv[1:] if argv is None else argv)
    if command != 'serve':
        logging.basicConfig(level=logging.DEBUG if options.debug else logging.WARNING,
                            format='%(levelname)s %(message)s', stream=sys.stderr)
    handler = {'serve': command_serve, 'vms': command_vms, 'check-config': command_check_config,
               'demo': command_demo, 'client': command_client}[command]
    return handler(options, args)


# ----------------------------------------------------------------------------- the demo ---
#
# `demo` builds a sample host in a temporary folder: two repositories listed in the
# configuration, VMs with sparse disks that hold some data, a throwaway CA and certificate,
# and a stand-in OVM Manager on 127.0.0.1 that knows one user. It serves on 127.0.0.1 and
# prints curl commands to try; Ctrl-C removes everything it made.

DEMO_REPOSITORIES = ('0004fb0000030000aaaa000000000001', '0004fb0000030000aaaa000000000002')


def make_certificates(folder, names=('localhost',), addresses=('127.0.0.1',)):
    """A CA and a server certificate made with the openssl command (the stdlib cannot)."""
    paths = dict((n, os.path.join(folder, n)) for n in (
        'ca-key.pem', 'ca-pub.pem', 'srv-key.pem', 'srv-pub.pem', 'srv.csr', 'san.cnf'))
    sans = ['DNS:%s' % n for n in names] + ['IP:%s' % a for a in addresses]
    with open(paths['san.cnf'], 'w') as handle:
        handle.write('subjectAltName = %s\nbasicConstraints = CA:FALSE\n' % ', '.join(sans))
    commands = [
        ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '30', '-subj',
         '/CN=ovm_exporter demo CA', '-keyout', paths['ca-key.pem'], '-out', paths['ca-pub.pem']],
        ['req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=%s' % names[0],
         '-keyout', paths['srv-key.pem'], '-out', paths['srv.csr']],
        ['x509', '-req', '-in', paths['srv.csr'], '-CA', paths['ca-pub.pem'], '-CAkey',
         paths['ca-key.pem'], '-CAcreateserial', '-days', '30', '-sha256', '-extfile',
         paths['san.cnf'], '-out', paths['srv-pub.pem']],
    ]
    for command in commands:
        process = subprocess.Popen(['openssl'] + command, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        output = process.communicate()[0]
        if process.returncode != 0:
            raise RuntimeError('openssl %s failed: %s' % (command[0], output.decode(
                'utf-8', 'replace')))
    return paths


def write_demo_disk(path, size, seed):
    """A sparse disk image with a few MiB of data at scattered offsets."""
    rng = random.Random(seed)
    with open(path, 'wb') as handle:
        handle.truncate(size)
        for index in range(6):
            handle.seek(rng.randrange(0, size - (1 << 20)) & ~4095)
            handle.write(to_bytes('demo disk %s block %d\n' % (seed, index)) * 20000)


def make_demo_host(folder):
    """Repositories, VMs and disks; returns the [[repository]] list for the config."""
    repositories = []
    for index, repo_id in enumerate(DEMO_REPOSITORIES):
        mount_point = os.path.join(folder, 'OVS', 'Repositories', repo_id)
        for sub in ('VirtualDisks', 'VirtualMachines', 'ISOs'):
            os.makedirs(os.path.join(mount_point, sub))
        repositories.append({'id': repo_id, 'mount_point': mount_point,
                             'filesystem': 'demo'})
    iso = os.path.join(repositories[1]['mount_point'], 'ISOs',
                       '0004fb0000150000aaaa000000000001.iso')
    write_demo_disk(iso, 8 << 20, 'iso')
    for number, friendly in ((1, 'web-server'), (2, 'database')):
        repo = repositories[0]['mount_point']
        vm_name = '0004fb0000060000aaaa00000000000%d' % number
        disks = []
        for letter in ('a', 'b')[:number]:
            disk_name = '0004fb0000120000aaaa0000000000%d%s.img' % (number, letter)
            disk_path = os.path.join(repo, 'VirtualDisks', disk_name)
            write_demo_disk(disk_path, 256 << 20, disk_name)
            disks.append('file:%s,xvd%s,w' % (disk_path, letter))
        disks.append('file:%s,xvdc:cdrom,r' % iso)
        vm_dir = os.path.join(repo, 'VirtualMachines', vm_name)
        os.makedirs(vm_dir)
        with open(os.path.join(vm_dir, 'vm.cfg'), 'w') as handle:
            handle.write("OVM_simple_name = '%s'\nname = '%s'\nuuid = '%s'\ndisk = %r\n"
                         "memory = 2048\nvcpus = 2\n"
                         % (friendly, vm_name, str(uuid.UUID(vm_name)), disks))
    return repositories


DEMO_MANAGER_TIMEOUT = 10.0


def start_demo_manager(tls_wrap, username, password):
    """A stand-in OVM Manager answering the one call the exporter makes."""
    expected = 'Basic ' + base64.b64encode(to_bytes('%s:%s' % (username, password))).decode(
        'ascii')

    class DemoManagerHandler(http_server.BaseHTTPRequestHandler):
        def do_GET(self):
            authorized = constant_time_equal(to_bytes(self.headers.get('Authorization', '')),
                                             to_bytes(expected))
            if self.path != MANAGER_LOGIN_PATH or not authorized:
                status, body = 401, b'[]'
            else:
                status, body = 200, to_bytes(json_dumps([{
                    'type': 'com.oracle.ovm.mgr.ws.model.Repository',
                    'value': DEMO_REPOSITORIES[0], 'name': 'demo repository',
                    'uri': 'https://127.0.0.1/ovm/core/wsapi/rest/Repository/'
                           + DEMO_REPOSITORIES[0]}]))
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def setup(self):
            # TLS on the accepted connection (the listening socket cannot be wrapped on 2.6).
            self.request.settimeout(DEMO_MANAGER_TIMEOUT)
            self.request = tls_wrap(self.request)
            http_server.BaseHTTPRequestHandler.setup(self)

        def finish(self):
            try:
                http_server.BaseHTTPRequestHandler.finish(self)
            finally:
                self.request.close()

        def log_message(self, format, *args):
            pass

    class DemoManagerServer(http_server.HTTPServer):
        def handle_error(self, request, client_address):
            log.debug('demo Manager: connection from %s failed: %s', client_address[0],
                      sys.exc_info()[1])

    httpd = DemoManagerServer(('127.0.0.1', 0), DemoManagerHandler)
    worker = threading.Thread(target=httpd.serve_forever)
    worker.daemon = True
    worker.start()
    return httpd


def demo_instructions(config, paths, server, password, folder):
    url = 'https://127.0.0.1:%d/api/v1' % server.address[1]
    vm = '0004fb0000060000aaaa000000000001'
    disk = '0004fb0000120000aaaa00000000001a.img'
    live = os.path.join(config.repository[0]['mount_point'], 'VirtualDisks', disk)
    curl = 'curl -sf -w "\\n" --cacert "$CA"'
    auth = '-H "Authorization: Bearer $TOKEN"'
    field = '%s -c \'import json,sys; print(json.load(sys.stdin)["%%s"])\'' % sys.executable
    return '\n'.join([
        '',
        'ovm_exporter demo: a sample Oracle VM host in %s' % folder,
        'Login: user "admin", password "%s" (checked by a stand-in OVM Manager).' % password,
        'Snapshots of this folder are %s.' % (
            'real copy-on-write clones' if clone_supported(SnapshotFolders.base(
                config.repository[0]['mount_point']))[0]
            else 'sparse copies (this filesystem cannot clone; on OVM they are OCFS2 reflinks)'),
        'Try these in another shell (bash), then press Ctrl-C here to stop and clean up:',
        '',
        'CA=%s' % paths['ca-pub.pem'],
        'URL=%s' % url,
        "TOKEN=$(%s -X POST -d '{\"username\": \"admin\", \"password\": \"%s\"}' $URL/auth/login"
        " | %s)" % (curl, password, field % 'token'),
        '%s %s $URL/vms' % (curl, auth),
        'SNAP1=$(%s %s -X POST $URL/vms/%s/snapshots | %s)' % (curl, auth, vm, field % 'id'),
        '%s %s -H "Range: bytes=0-1048575" -o first-mib.img $URL/vms/%s/snapshots/$SNAP1/'
        'disks/%s' % (curl, auth, vm, disk),
        "printf 'changed' | dd of=%s bs=1 seek=4096 conv=notrunc status=none" % live,
        'SNAP2=$(%s %s -X POST $URL/vms/%s/snapshots | %s)' % (curl, auth, vm, field % 'id'),
        '%s %s "$URL/vms/%s/snapshots/$SNAP2?compareTo=$SNAP1"' % (curl, auth, vm),
        '%s %s -X DELETE $URL/vms/%s/snapshots' % (curl, auth, vm),
        '',
    ])


def command_demo(options, args):
    folder = tempfile.mkdtemp(prefix='ovm-exporter-demo-')
    try:
        try:
            paths = make_certificates(folder)
        except (OSError, RuntimeError) as exc:
            return cli_error('the demo needs the openssl command to make a certificate: %s' % exc)
        password = binascii.hexlify(os.urandom(6)).decode('ascii')
        config = default_config()
        config.values.update({
            'db_file': os.path.join(folder, 'exporter.db'),
            'ovm_fingerprint_file': os.path.join(folder, 'ovm-manager.fingerprint'),
            'jwt.secret': binascii.hexlify(os.urandom(32)).decode('ascii'),
            'api.bind': '127.0.0.1', 'api.port': options.port,
            'api.tls.certificate': paths['srv-pub.pem'], 'api.tls.key': paths['srv-key.pem'],
            'api.tls.ca_certificate': paths['ca-pub.pem'],
            'repository': make_demo_host(folder)})
        config = Config(config.values, 'demo')
        config.demo = True
        setup_logging(config, options.debug)
        tls_wrap = make_server_tls(config)
        manager = start_demo_manager(tls_wrap, 'admin', password)
        config.values['ovm_endpoint'] = config.ovm_endpoint = (
            'https://127.0.0.1:%d' % manager.server_address[1])
        validate_config(config)
        preflight(config)

        def announce(server):
            sys.stdout.write(demo_instructions(config, paths, server, password, folder) + '\n')
            sys.stdout.flush()
        serve(config, ready=announce)
        manager.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.write('demo stopped; removed %s\n' % folder)
    return 0


def _terminal_progress(name):
    """A progress(done, total) that rewrites one line on a terminal (None elsewhere)."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def progress(done, total):
        now = time.time()
        if now - last[0] >= 0.25 or done == total:
            last[0] = now
            sys.stderr.write('\r%s: %.1f of %.1f MiB (%d%%)%s' % (
                name, done / 1048576.0, total / 1048576.0, 100 * done // max(total, 1),
                '\n' if done == total else ''))
            sys.stderr.flush()
    return progress


def command_client(options, args):
    usage = ('client commands: vms | snapshot VM | download VM SNAPSHOT DISK IMAGE '
             '[--compare-to OLDER] [--verify]  (with --url, --user, --cacert or --insecure)')
    if not args or not options.url:
        return cli_error(usage)
    password = os.environ.get('OVM_EXPORTER_PASSWORD')
    if password is None:
        import getpass
        password = getpass.getpass('password for %s: ' % options.user)
    client = ExporterClient(options.url, options.cacert, options.insecure)
    try:
        client.login(options.user, password)
        if args[0] == 'vms' and len(args) == 1:
            print(json.dumps(client.vms(), indent=2, sort_keys=True))
        elif args[0] == 'snapshot' and len(args) == 2:
            print(json.dumps(client.create_snapshot(args[1]), indent=2, sort_keys=True))
        elif args[0] == 'download' and len(args) == 5:
            count = client.sync_disk(args[1], args[2], args[3], args[4], options.compare_to,
                                     progress=_terminal_progress(args[4]))
            print('%s: downloaded %d bytes' % (args[4], count))
            if options.verify:
                repaired = client.verify_disk(args[1], args[2], args[3], args[4])
                print('%s: sha256 matches the server%s' % (args[4], repaired and (
                    ' after %d bytes were downloaded again' % repaired) or ''))
        else:
            return cli_error(usage)
    except (ClientError, socket.error, ssl.SSLError, http_client.HTTPException, IOError,
            OSError) as exc:
        return cli_error(str(exc), 1)
    finally:
        client.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
