//! Who is on the other end of a Workload API connection, and whether it is
//! still the process that connected. The kernel records the peer's pid when
//! it connects; a process can then exec another program (or exit and have
//! its pid reused) while a child holding the socket asks for an identity.
//! So when a connection is accepted, Castellan notes the process's start
//! time and the executable it runs, and every call checks both again,
//! before and after it gathers the evidence: a process that exec'd, exited
//! or was replaced is refused.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// What identifies one run of one program: the process's start time (clock
/// ticks since boot, unique per pid) and its executable's device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    start_time: u64,
    exe: (u64, u64),
}

impl Origin {
    /// The process `pid` as it is now, if it can be read.
    pub fn of(pid: i32) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `comm` (field 2) is in parentheses and may hold anything; the
        // fields after its closing one start at field 3.
        let after = stat.rsplit_once(')')?.1;
        let start_time = after.split_whitespace().nth(19)?.parse().ok()?;
        let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        Some(Self {
            start_time,
            exe: (exe.dev(), exe.ino()),
        })
    }
}

/// A connection's peer: the kernel's credentials, and the process as it was
/// when the connection was accepted.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub uds: UdsConnectInfo,
    pub origin: Option<Origin>,
}

impl PeerInfo {
    /// Whether `pid` is still the process that connected.
    pub fn still_connected_process(&self, pid: i32) -> bool {
        self.origin.is_some_and(|o| Origin::of(pid) == Some(o))
    }
}

/// An accepted Workload API connection.
pub struct Peer {
    stream: UnixStream,
    origin: Option<Origin>,
}

impl Peer {
    /// Notes who connected, at once.
    pub fn accept(stream: UnixStream) -> Self {
        let origin = stream.peer_cred().ok().and_then(|c| c.pid()).and_then(Origin::of);
        Self { stream, origin }
    }
}

impl Connected for Peer {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            uds: self.stream.connect_info(),
            origin: self.origin,
        }
    }
}

impl AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_start_time_and_executable() {
        let me = std::process::id() as i32;
        let now = Origin::of(me).unwrap();
        assert_eq!(Origin::of(me), Some(now), "stable while the process runs");
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let other = Origin::of(child.id() as i32).unwrap();
        assert_ne!(other, now);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(Origin::of(child.id() as i32), None, "gone");
    }
}
