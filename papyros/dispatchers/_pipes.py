"""The framing of the process backend's pipes: a small header, then opaque payloads.

A message is a prefix (the lengths of its header and of its payloads in all),
a small pickled header, and the payloads (units one way, outcomes the other)
back to back. Payloads are never pickled again and large ones are never
copied: they go from their own buffers to the pipe in one ``writev`` (a
message whose payloads are small is joined into one buffer first), and the
receiver reads the message straight into one buffer of its size (``readv``)
and gets each payload as a view of it. Where pipes are not file descriptors
(Windows), a message is one :class:`~multiprocessing.connection.Connection`
message.

On Linux each pipe is enlarged to 1 MB (less when a dispatcher has many
workers, to stay within the user's budget of pipe buffers): a pipe of the
default 64 KB would carry a 1 MB unit in 16 pieces, each a wake-up of the
reader and of the writer.
"""

from __future__ import annotations

import logging
import math
import multiprocessing.connection
import os
import pickle
import select
import struct
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from papyros._deadline import LONGEST_WAIT

if sys.platform == "linux":
    from fcntl import F_SETPIPE_SZ, fcntl

__all__ = ["ReadyWaiter", "enlarge_pipe", "pipe_bytes", "recv_framed", "send_framed"]

logger = logging.getLogger(__name__)

_PROTOCOL = pickle.HIGHEST_PROTOCOL
# A message's prefix: the lengths of its header and of its payloads in all.
_PREFIX = struct.Struct("<IQ")
# Messages whose payloads are smaller than this are joined into one buffer before they are
# written; larger ones are written straight from where they lie, with no copy (writev).
_JOIN_BYTES = 1 << 16
# The most buffers one writev() takes.
_IOV_MAX = 1024
# Where pipes are not file descriptors (Windows), a message is one Connection message.
_FD_PIPES = hasattr(os, "writev")
# A Linux pipe holds 64 KB unless enlarged: a 1 MB unit then crosses in 16 pieces, each a
# wake-up of the reader and of the writer. Enlarged pipes carry large units in a piece or
# two. Pipe buffers count against a per-user budget (fs.pipe-user-pages-soft, 64 MB by
# default) past which the user's new pipes get tiny buffers: a dispatcher takes at most
# _PIPE_BUDGET of it, across its workers' two pipes each.
_PIPE_BYTES = 1 << 20
_PIPE_BUDGET = 16 << 20
_PIPE_DEFAULT = 1 << 16


def pipe_bytes(num_workers: int) -> int:
    """The size to give each of the pipes of ``num_workers`` workers: a power of two."""
    size = _PIPE_BYTES
    while size > _PIPE_DEFAULT and size * 2 * num_workers > _PIPE_BUDGET:
        size //= 2
    return size


def enlarge_pipe(conn: Connection, size: int) -> None:
    """Make the pipe of ``conn`` hold ``size`` bytes where the OS allows it; else leave it."""
    if sys.platform != "linux" or size <= _PIPE_DEFAULT:
        return
    try:
        fcntl(conn.fileno(), F_SETPIPE_SZ, size)
    except OSError as exc:  # Over fs.pipe-max-size or the user's budget: it works, slower.
        logger.debug("could not enlarge a worker pipe to %d bytes: %s", size, exc)


def send_framed(conn: Connection, header: Any, payloads: list[Any]) -> None:
    """Send a small pickled header and the opaque payloads (units or outcomes) it describes.

    A payload is a bytes-like object, or a tuple of them that travel back to
    back (a pickle in pieces, made so that a large buffer it holds is never
    copied); the receiver gets each payload as one buffer. Payloads are never
    pickled again, and large ones are never copied: they go from their own
    buffers to the pipe.
    """
    pieces: list[Any] = []
    lengths = []
    for payload in payloads:
        if type(payload) is tuple:
            pieces.extend(payload)
            lengths.append(sum(map(len, payload)))
        else:
            pieces.append(payload)
            lengths.append(len(payload))
    head = pickle.dumps((header, lengths), _PROTOCOL)
    body = sum(lengths)
    prefix = _PREFIX.pack(len(head), body)
    if not _FD_PIPES:
        conn.send_bytes(b"".join([prefix, head, *pieces]))
    elif body < _JOIN_BYTES:
        _write_all(conn.fileno(), [b"".join([prefix, head, *pieces])])
    else:
        _write_all(conn.fileno(), [prefix, head, *pieces])


def _write_all(fd: int, buffers: list[Any]) -> None:
    """Write every byte of ``buffers``, in order, to ``fd``, however the OS splits the writes."""
    views = [memoryview(buffer) for buffer in buffers if len(buffer)]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


def recv_framed(conn: Connection) -> tuple[Any, list[Any]]:
    """Receive what :func:`send_framed` sent: the header, and the payloads as buffers.

    The message is read straight into one buffer of its size; the payloads are
    views of it. Raises EOFError if the pipe is closed between messages.
    """
    if _FD_PIPES:
        fd = conn.fileno()
        head_size, body_size = _PREFIX.unpack(_read_exactly(fd, _PREFIX.size, at_start=True))
        view = memoryview(_read_exactly(fd, head_size + body_size, at_start=False))
    else:
        message = memoryview(conn.recv_bytes())
        head_size, _body_size = _PREFIX.unpack(message[: _PREFIX.size])
        view = message[_PREFIX.size :]
    header, lengths = pickle.loads(view[:head_size])
    payloads = []
    end = head_size
    for length in lengths:
        payloads.append(view[end : end + length])
        end += length
    return header, payloads


def _read_exactly(fd: int, size: int, *, at_start: bool) -> bytearray:
    """Read ``size`` bytes from ``fd`` into a new buffer."""
    data = bytearray(size)
    view = memoryview(data)
    done = 0
    while done < size:
        count = os.readv(fd, [view[done:]])
        if not count:
            if at_start and not done:
                raise EOFError
            raise OSError("the pipe closed in the middle of a message")
        done += count
    return data


class ReadyWaiter:
    """:func:`multiprocessing.connection.wait` for a set of objects that seldom changes.

    ``wait`` builds a selector, registers every object and closes it again on
    each call, which costs more than the poll itself; this keeps one poll
    object while the objects stay the same. Where there is no ``select.poll``
    (Windows), it is ``wait`` itself.
    """

    def __init__(self) -> None:
        self._objects: tuple[Any, ...] = ()
        self._by_fd: dict[int, Any] = {}
        self._poll: Any = None

    def wait(self, objects: Sequence[Any], timeout: float | None) -> list[Any]:
        """The objects of ``objects`` that are ready (readable, or closed at the other end)."""
        if timeout is not None:
            timeout = min(timeout, LONGEST_WAIT)
        if not hasattr(select, "poll"):
            return multiprocessing.connection.wait(objects, timeout)
        if len(objects) != len(self._objects) or any(
            new is not old for new, old in zip(objects, self._objects, strict=True)
        ):
            poll = select.poll()
            by_fd = {}
            for each in objects:
                fd = each if isinstance(each, int) else each.fileno()
                poll.register(fd, select.POLLIN)
                by_fd[fd] = each
            self._poll, self._by_fd, self._objects = poll, by_fd, tuple(objects)
        # Rounded up: a wait of 0.4 ms must not become a busy poll(0).
        milliseconds = None if timeout is None else math.ceil(timeout * 1000)
        return [self._by_fd[fd] for fd, _events in self._poll.poll(milliseconds)]
