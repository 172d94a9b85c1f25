//! Unix stream sockets: descriptors over `SCM_RIGHTS`, and `poll`.

use std::io;
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

/// Waits up to `timeout` for `sock` to become readable (and writable, when
/// asked) or hung up. A zero timeout only checks. `poll(2)`
pub(crate) fn poll(sock: BorrowedFd<'_>, want_write: bool, timeout: Duration) -> io::Result<Ready> {
    let mut events = libc::POLLIN | libc::POLLRDHUP;
    if want_write {
        events |= libc::POLLOUT;
    }
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    };
    // Round up so a sub-millisecond timeout still waits instead of spinning.
    let ms = timeout.as_micros().div_ceil(1000);
    let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
    // EINTR is retried with the same timeout: callers loop on their own deadline.
    retry_eintr(|| {
        // SAFETY: `pfd` is one valid pollfd.
        cvt(unsafe { libc::poll(&mut pfd, 1, ms) })
    })?;
    let r = pfd.revents;
    Ok(Ready {
        readable: r & libc::POLLIN != 0,
        writable: r & libc::POLLOUT != 0,
        hung_up: r & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0,
    })
}
