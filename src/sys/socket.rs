//! Unix stream sockets: descriptors over `SCM_RIGHTS`, and `poll`.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::{cvt, cvt_size, retry_eintr};

/// The most descriptors one `recvmsg` accepts. A peer sends exactly one; room
/// for more lets us tell "two descriptors" apart from a truncated message.
const MAX_FDS: usize = 8;

/// Sends `bytes` with one descriptor attached, without blocking and without
/// raising `SIGPIPE`. Returns the number of bytes sent (the descriptor goes
/// with the first byte). `sendmsg(2)`, `unix(7)`
pub(crate) fn send_with_fd(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<usize> {
    let raw: RawFd = fd.as_raw_fd();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut cmsg_buf = [0u64; 4];
    let fd_bytes = u32::try_from(size_of::<RawFd>()).unwrap_or(4);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    debug_assert!(space <= size_of_val(&cmsg_buf));
    // SAFETY: an all-zero msghdr is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` bytes, enough for one header.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(io::Error::other("no room for a control message"));
    }
    // SAFETY: an all-zero cmsghdr is a valid value (it may have padding).
    let mut header: libc::cmsghdr = unsafe { std::mem::zeroed() };
    header.cmsg_level = libc::SOL_SOCKET;
    header.cmsg_type = libc::SCM_RIGHTS;
    // SAFETY: CMSG_LEN only computes a size.
    header.cmsg_len = unsafe { libc::CMSG_LEN(fd_bytes) } as _;
    // SAFETY: `cmsg` points into `cmsg_buf` with room for the header and one
    // descriptor (checked above).
    unsafe { cmsg.write_unaligned(header) };
    // SAFETY: `cmsg` is a valid header in the buffer; its data follows it.
    let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
    // SAFETY: the data of this header has room for one descriptor.
    unsafe { data.write_unaligned(raw) };
    retry_eintr(|| {
        // SAFETY: `msg` and everything it points to are valid for the call.
        cvt_size(unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        })
    })
}

/// Sends plain bytes without blocking and without raising `SIGPIPE`.
/// `send(2)`
pub(crate) fn send(sock: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    retry_eintr(|| {
        // SAFETY: `bytes` is valid for reads of its length.
        cvt_size(unsafe {
            libc::send(
                sock.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        })
    })
}

/// Sends what `bufs` hold without raising `SIGPIPE`: as far as the socket
/// takes it now, or (`wait`, on a blocking socket) waiting in the kernel
/// until it has taken all of it. `sendmsg(2)`
pub(crate) fn send_vectored(
    sock: BorrowedFd<'_>,
    bufs: &[std::io::IoSlice<'_>],
    wait: bool,
) -> io::Result<usize> {
    let flags = if wait {
        libc::MSG_NOSIGNAL
    } else {
        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `iovec` on Unix (std guarantees it);
    // sendmsg only reads the buffers.
    msg.msg_iov = bufs.as_ptr().cast_mut().cast::<libc::iovec>();
    msg.msg_iovlen = bufs.len();
    retry_eintr(|| {
        // SAFETY: `msg` points at `bufs.len()` iovecs of live, readable
        // buffers, and has no name or control data.
        cvt_size(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags) })
    })
}

/// Receives into `buf`, waiting for bytes if the socket is blocking (and
/// the caller asks to wait) or not at all. `recv(2)`
pub(crate) fn recv_into(sock: BorrowedFd<'_>, buf: &mut [u8], wait: bool) -> io::Result<usize> {
    let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
    retry_eintr(|| {
        // SAFETY: `buf` is writable for its length.
        cvt_size(unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) })
    })
}

/// What one `recvmsg` brought.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes written to the buffer; 0 means the peer closed.
    pub(crate) len: usize,
    /// Every descriptor that arrived, owned from the moment we saw it.
    pub(crate) fds: Vec<OwnedFd>,
    /// The kernel dropped control data that did not fit (`MSG_CTRUNC`).
    pub(crate) control_truncated: bool,
}

/// Receives bytes and any descriptors, without blocking. Received descriptors
/// are close-on-exec atomically (`MSG_CMSG_CLOEXEC`). `recvmsg(2)`, `unix(7)`
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Aligned for cmsghdr; room for MAX_FDS descriptors in one header.
    let mut cmsg_buf = [0u64; 2 + MAX_FDS / 2 + 2];
    // SAFETY: an all-zero msghdr is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&cmsg_buf) as _;
    let len = retry_eintr(|| {
        // SAFETY: `msg` points to a valid iovec over `buf` and a control buffer
        // of msg_controllen bytes, all live for the call.
        cvt_size(unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        })
    })?;
    let mut fds = Vec::new();
    // SAFETY: recvmsg filled `msg`; CMSG_FIRSTHDR reads only msg_control(len).
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header returned by CMSG_FIRSTHDR/NXTHDR lies
        // within the control buffer the kernel filled.
        let header = unsafe { std::ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let data_offset = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (header.cmsg_len as usize).saturating_sub(data_offset) / size_of::<RawFd>();
            // SAFETY: the data of this header lies within the control buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, so the address stays inside this
                // header's data.
                let at = unsafe { data.add(i) };
                // SAFETY: the kernel wrote a descriptor there.
                let raw = unsafe { at.read_unaligned() };
                // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor in
                // this process; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `cmsg` is a valid header within `msg`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        len,
        fds,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Readiness reported by [`poll`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ready {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    /// The peer shut down or the connection broke (`POLLHUP`, `POLLRDHUP`, `POLLERR`).
    pub(crate) hung_up: bool,
}

/// One descriptor for [`poll`], and what it showed.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct PollFd<'fd>(libc::pollfd, PhantomData<BorrowedFd<'fd>>);

impl<'fd> PollFd<'fd> {
    /// Watch `fd` for reading and hang-up, and for writing when asked.
    pub(crate) fn new(fd: BorrowedFd<'fd>, want_write: bool) -> PollFd<'fd> {
        let mut events = libc::POLLIN | libc::POLLRDHUP;
        if want_write {
            events |= libc::POLLOUT;
        }
        PollFd(
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events,
                revents: 0,
            },
            PhantomData,
        )
    }

    /// An entry `poll` skips (a negative descriptor): a filler for arrays.
    pub(crate) const fn ignored() -> PollFd<'static> {
        PollFd(
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            },
            PhantomData,
        )
    }

    /// What the last [`poll`] saw on the descriptor.
    pub(crate) fn ready(&self) -> Ready {
        let r = self.0.revents;
        Ready {
            readable: r & libc::POLLIN != 0,
            writable: r & libc::POLLOUT != 0,
            hung_up: r & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        }
    }
}

/// Waits up to `timeout` for any of `fds` to become ready (as each asks) or
/// hung up; returns how many are. A zero timeout only checks. `poll(2)`
pub(crate) fn poll(fds: &mut [PollFd<'_>], timeout: Duration) -> io::Result<usize> {
    // Round up so a sub-millisecond timeout still waits instead of spinning.
    let ms = libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    let n = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // EINTR is retried with the same timeout: callers loop on their own deadline.
    let ready = retry_eintr(|| {
        // SAFETY: `fds` holds `n` pollfds (PollFd is a transparent wrapper)
        // of descriptors borrowed for as long as `fds` lives; poll writes
        // only their `revents`.
        cvt(unsafe { libc::poll(fds.as_mut_ptr().cast::<libc::pollfd>(), n, ms) })
    })?;
    Ok(ready.unsigned_abs() as usize)
}

/// [`poll`] for one socket.
pub(crate) fn poll_one(
    sock: BorrowedFd<'_>,
    want_write: bool,
    timeout: Duration,
) -> io::Result<Ready> {
    let mut fds = [PollFd::new(sock, want_write)];
    poll(&mut fds, timeout)?;
    Ok(fds[0].ready())
}

/// Waits up to `timeout` for `sock` to take more bytes (or break): unlike
/// [`poll_one`], bytes waiting to be read do not end the wait, so a sender
/// that waits for room does not spin while its peer talks.
pub(crate) fn poll_writable(sock: BorrowedFd<'_>, timeout: Duration) -> io::Result<Ready> {
    let mut fds = [PollFd(
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        },
        PhantomData,
    )];
    poll(&mut fds, timeout)?;
    Ok(fds[0].ready())
}

/// Where a Unix socket lives: a path in the file system, or a name in the
/// Linux abstract namespace (no file; gone when the last socket closes).
#[derive(Debug, Clone, Copy)]
pub(crate) enum UnixAddr<'a> {
    Path(&'a std::path::Path),
    Abstract(&'a [u8]),
}

/// Builds a `sockaddr_un` for `addr`. `unix(7)`
fn sockaddr_un(addr: UnixAddr<'_>) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is a valid (empty) value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    let (bytes, offset): (&[u8], usize) = match addr {
        UnixAddr::Path(p) => (p.as_os_str().as_bytes(), 0),
        // Abstract names start with a NUL byte.
        UnixAddr::Abstract(name) => (name, 1),
    };
    let room = sa.sun_path.len() - offset;
    // A path needs a terminating NUL; a name may fill the rest.
    let fits = match addr {
        UnixAddr::Path(_) => bytes.len() < room && !bytes.contains(&0) && !bytes.is_empty(),
        UnixAddr::Abstract(_) => bytes.len() <= room && !bytes.is_empty(),
    };
    if !fits {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path or name empty, too long, or with a NUL byte",
        ));
    }
    for (dst, &src) in sa.sun_path[offset..].iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let len = match addr {
        UnixAddr::Path(_) => base + bytes.len() + 1,
        UnixAddr::Abstract(_) => base + 1 + bytes.len(),
    };
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok((sa, len))
}

/// A new Unix stream socket, close-on-exec and non-blocking (a listener
/// waits for connections in `poll`). `socket(2)`
fn unix_stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain arguments; the result is a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: socket returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening Unix stream socket at `addr`. For a path, the socket file is
/// created with `mode` (further limited by the umask): the mode is set on
/// the socket before `bind`, so the file never exists with wider access.
/// `bind(2)`, `listen(2)`, `fchmod(2)`
pub(crate) fn listen_unix(addr: UnixAddr<'_>, mode: u32, backlog: i32) -> io::Result<OwnedFd> {
    let (sa, len) = sockaddr_un(addr)?;
    let fd = unix_stream_socket()?;
    if let UnixAddr::Path(_) = addr {
        // SAFETY: `fd` is a valid descriptor.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
    }
    // SAFETY: `sa` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    // SAFETY: `fd` is a bound socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// A Unix stream socket connected to `addr`, non-blocking, close-on-exec:
/// a listener whose backlog is full fails with `WouldBlock` instead of
/// making us wait. `connect(2)`
pub(crate) fn connect_unix_nowait(addr: UnixAddr<'_>) -> io::Result<OwnedFd> {
    let (sa, len) = sockaddr_un(addr)?;
    // SAFETY: plain arguments; the result is a new descriptor or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: socket returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    retry_eintr(|| {
        // SAFETY: `sa` is a valid sockaddr_un of `len` bytes.
        cvt(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_un).cast(),
                len,
            )
        })
    })?;
    Ok(fd)
}

/// Accepts a connection, close-on-exec and non-blocking (the channel uses
/// its socket only with `poll` and `MSG_DONTWAIT`). On a non-blocking
/// listener, `WouldBlock` when none is waiting. `accept4(2)`
pub(crate) fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fd = retry_eintr(|| {
        // SAFETY: `listener` is a valid descriptor; null address is allowed.
        cvt(unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        })
    })?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The process, user and group of the peer of a connected Unix socket, as
/// the kernel recorded them at `connect` (or `socketpair`). `SO_PEERCRED`
pub(crate) fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    // SAFETY: an all-zero ucred is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).unwrap_or(12);
    // SAFETY: `cred` is writable for `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// Whether `fd` is a connected Unix stream socket: domain `AF_UNIX`, type
/// `SOCK_STREAM`. `getsockopt(2)`
pub(crate) fn is_unix_stream(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let get = |option| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4);
        // SAFETY: `value` is writable for `len` bytes.
        cvt(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        Ok(value)
    };
    Ok(get(libc::SO_DOMAIN)? == libc::AF_UNIX && get(libc::SO_TYPE)? == libc::SOCK_STREAM)
}
