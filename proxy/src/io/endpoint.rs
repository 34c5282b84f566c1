//! Local endpoints: the UNIX sockets and loopback TCP ports that QEMU, NBD and libvirt talk to.
//!
//! A `[[forward]]` listens on one, an `[[expose]]` connects to one. Both are written
//! `unix:/path/to.sock` or `tcp:127.0.0.1:49152` in the config.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Default permission bits of a forward's UNIX socket: only the agent's user (root, or the
/// user QEMU runs as when the agent runs as that user) may open a stream through the tunnel.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Who owns a UNIX socket the agent creates (`owner`, `group`; resolved to ids when the config
/// is validated). `None` leaves that id as the agent's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Ownership {
    /// Gives `path` (not following a symlink) this owner and group.
    pub fn apply(&self, path: &Path) -> io::Result<()> {
        if self.uid.is_none() && self.gid.is_none() {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, self.uid, self.gid)
    }
}

/// Where a local stream starts or ends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointParseError {
    #[error("expected \"unix:/absolute/path\" or \"tcp:IP:PORT\", got {0:?}")]
    Scheme(String),
    #[error("a UNIX socket path must be absolute, got {0:?}")]
    RelativePath(String),
    #[error("a UNIX socket path must be shorter than 108 bytes, got {0} bytes")]
    PathTooLong(usize),
    #[error("not an IP:PORT address: {0:?}")]
    TcpAddress(String),
}

/// `sun_path` is 108 bytes on Linux, including the terminating NUL.
const MAX_UNIX_PATH: usize = 107;

impl FromStr for Endpoint {
    type Err = EndpointParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(EndpointParseError::RelativePath(path.to_string()));
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(EndpointParseError::PathTooLong(path.len()));
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(Endpoint::Tcp)
                .map_err(|_| EndpointParseError::TcpAddress(addr.to_string()))
        } else {
            Err(EndpointParseError::Scheme(s.to_string()))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl Endpoint {
    /// Connects to this endpoint, giving up after `timeout`.
    pub async fn connect(&self, timeout: Duration) -> io::Result<LocalStream> {
        let fut = async {
            Ok::<_, io::Error>(match self {
                Endpoint::Unix(p) => LocalStream::Unix(UnixStream::connect(p).await?),
                Endpoint::Tcp(a) => {
                    let s = TcpStream::connect(a).await?;
                    s.set_nodelay(true)?;
                    LocalStream::Tcp(s)
                }
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

/// A bound local listener. Dropping it removes its UNIX socket file, if the file is still ours.
#[derive(Debug)]
pub enum LocalListener {
    Unix { listener: UnixListener, path: PathBuf, ino: u64 },
    Tcp(TcpListener),
}

impl LocalListener {
    /// Binds `endpoint`. A UNIX socket gets permission bits `mode`. A stale socket file (nothing
    /// accepts on it) is replaced; a live one, or a file that is not a socket, is an error:
    /// we never steal another process's socket.
    pub async fn bind(endpoint: &Endpoint, mode: u32) -> io::Result<LocalListener> {
        LocalListener::bind_owned(endpoint, mode, Ownership::default()).await
    }

    /// [`LocalListener::bind`], and a UNIX socket gets `owner`'s owner and group (before its
    /// mode, so that the mode's group bits are for that group from the start).
    pub async fn bind_owned(endpoint: &Endpoint, mode: u32, owner: Ownership) -> io::Result<LocalListener> {
        match endpoint {
            Endpoint::Tcp(addr) => Ok(LocalListener::Tcp(TcpListener::bind(addr).await?)),
            Endpoint::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path)?;
                let ino = std::fs::metadata(path)?.ino();
                // From here the file is ours: dropping the listener removes it on any error.
                let listener = LocalListener::Unix { listener, path: path.clone(), ino };
                owner.apply(path).map_err(|e| io::Error::new(e.kind(), format!("chown {}: {e}", path.display())))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                Ok(listener)
            }
        }
    }

    pub async fn accept(&self) -> io::Result<LocalStream> {
        match self {
            LocalListener::Unix { listener, .. } => Ok(LocalStream::Unix(listener.accept().await?.0)),
            LocalListener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok(LocalStream::Tcp(s))
            }
        }
    }

    /// The endpoint this listener is bound to (with the real port when the config said port 0).
    pub fn endpoint(&self) -> io::Result<Endpoint> {
        match self {
            LocalListener::Unix { path, .. } => Ok(Endpoint::Unix(path.clone())),
            LocalListener::Tcp(l) => Ok(Endpoint::Tcp(l.local_addr()?)),
        }
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        if let LocalListener::Unix { path, ino, .. } = self {
            // Only remove the file if it is still the socket we created: another agent may have
            // replaced it after we stopped accepting.
            if std::fs::symlink_metadata(&*path).map(|m| m.ino() == *ino).unwrap_or(false) {
                let _ = std::fs::remove_file(&*path);
            }
        }
    }
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; refusing to replace it", path.display()),
        ));
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is a live socket of another process; refusing to steal it", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// A local connection: one end of a tunnelled stream.
#[derive(Debug)]
pub enum LocalStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl LocalStream {
    /// Prepares an abortive close: a TCP peer sees a reset instead of an orderly EOF when the
    /// stream is dropped. UNIX stream sockets have no reset; closing them is all there is.
    pub fn set_reset_on_drop(&self) {
        if let LocalStream::Tcp(s) = self {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            LocalStream::Unix($s) => $e,
            LocalStream::Tcp($s) => $e,
        }
    };
}

impl AsyncRead for LocalStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl crate::io::DirectRead for LocalStream {
    fn poll_read_direct(&mut self, cx: &mut Context<'_>, bufs: &mut [io::IoSliceMut<'_>]) -> Option<Poll<io::Result<usize>>> {
        Some(loop {
            let ready = match self {
                LocalStream::Unix(s) => s.poll_read_ready(cx),
                LocalStream::Tcp(s) => s.poll_read_ready(cx),
            };
            match ready {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
            let r = match self {
                LocalStream::Unix(s) => s.try_read_vectored(bufs),
                LocalStream::Tcp(s) => s.try_read_vectored(bufs),
            };
            match r {
                // The readiness was stale (tokio cleared it): wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break Poll::Ready(r),
            }
        })
    }
}

impl crate::io::PullWrite for LocalStream {
    fn poll_pull(
        &mut self,
        _: &mut Context<'_>,
        _: &mut dyn crate::io::DirectRead,
    ) -> Option<Poll<Result<usize, crate::io::PullError>>> {
        None
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

impl crate::io::Reset for LocalStream {
    fn set_reset_on_drop(&self) {
        LocalStream::set_reset_on_drop(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_schemes() {
        assert_eq!("unix:/run/a.sock".parse(), Ok(Endpoint::Unix("/run/a.sock".into())));
        assert_eq!("tcp:127.0.0.1:5".parse(), Ok(Endpoint::Tcp("127.0.0.1:5".parse().unwrap())));
        assert!(matches!("unix:rel.sock".parse::<Endpoint>(), Err(EndpointParseError::RelativePath(_))));
        assert!(matches!("udp:1.2.3.4:5".parse::<Endpoint>(), Err(EndpointParseError::Scheme(_))));
        assert!(matches!("tcp:localhost".parse::<Endpoint>(), Err(EndpointParseError::TcpAddress(_))));
        let long = format!("unix:/{}", "a".repeat(120));
        assert!(matches!(long.parse::<Endpoint>(), Err(EndpointParseError::PathTooLong(_))));
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let ep = Endpoint::Unix(path.clone());
        // A stale socket: bound by a std listener that is then dropped (the file stays).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = LocalListener::bind(&ep, 0o600).await.expect("stale socket replaced");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let err = LocalListener::bind(&ep, 0o600).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(live);
        assert!(!path.exists(), "our socket file is removed on drop");

        let file = dir.path().join("regular");
        std::fs::write(&file, b"x").unwrap();
        let err = LocalListener::bind(&Endpoint::Unix(file.clone()), 0o600).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(file.exists(), "a regular file is never removed");
    }
}
