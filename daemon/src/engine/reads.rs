//! Read sizes that follow a connection's speed.
//!
//! hyper reads a response into buffers that grow with what each read brings, and a frame
//! it hands on keeps its buffer alive until the writer thread has written it. A slow
//! download that receives bursts (a server pacing it, a congested link) thus holds two
//! buffers of the burst's size, and with fifty of them the daemon's memory per download was
//! 180 KiB. Reading a slow connection in small pieces leaves the bytes waiting in the
//! kernel's socket buffer instead, and hyper's buffers stay small; a fast connection reads
//! as much as is there, which is what keeps a 1 GiB download cheap (16 KiB reads for
//! every connection cost it three times the CPU).
//!
//! Speed is measured here, per connection, over windows: a slow connection's read brings
//! at most what arrived in a millisecond at its last measured rate (at least [`SLOW_READ`]),
//! so it reads about a thousand times a second whatever its speed; a fast one reads without
//! limit. A new connection, or one whose last window brought nothing (idle in the pool),
//! counts as fast until its first window of [`WINDOW`] says otherwise: small files, which
//! end within it, read whole. A slow connection that brought [`FAST`] per second over
//! [`WINDOW`] is fast; a fast one turns slow only after a window of [`SLOW_WINDOW`] or more
//! under that rate (a fast download pauses while its writer catches up with the disk).
//!
//! A small body the engine holds whole in memory anyway (see `SMALL_BODY`) gains nothing from
//! small reads: the engine grants its connection a [`ReadAllowance`] of the body's length,
//! and those bytes read without limit. A connection busy with one small file after another
//! measures slow (it idles between them), and 4 KiB reads cost a 100 KiB file 25 reads
//! instead of two.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};

/// Bytes per second from which a connection counts as fast.
const FAST: u64 = 32 << 20;
/// Least a read of a slow connection may bring.
const SLOW_READ: usize = 4 << 10;
/// How long a measurement runs before a slow connection may count as fast.
const WINDOW: Duration = Duration::from_millis(100);
/// How long a fast connection must stay under [`FAST`] to count as slow again.
const SLOW_WINDOW: Duration = Duration::from_secs(2);

/// Wraps a connector: its connections read in pieces that follow their speed.
#[derive(Debug, Clone)]
pub struct SpeedSizedReads<C>(pub C);

impl<C> tower_service::Service<Uri> for SpeedSizedReads<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
{
    type Response = SpeedSized<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.0.call(dst);
        Box::pin(async move { connecting.await.map(SpeedSized::new) })
    }
}

/// A connection whose reads follow its speed (see the module).
#[derive(Debug)]
pub struct SpeedSized<T> {
    inner: T,
    speed: Speed,
    allowance: ReadAllowance,
}

impl<T> SpeedSized<T> {
    fn new(inner: T) -> SpeedSized<T> {
        SpeedSized { inner, speed: Speed::new(Instant::now()), allowance: ReadAllowance::default() }
    }
}

/// Bytes a connection may read without its speed's limit. Every response of the connection
/// carries a clone in its extensions.
#[derive(Debug, Clone, Default)]
pub struct ReadAllowance(Arc<AtomicU64>);

impl ReadAllowance {
    /// `bytes` more read on the connection are a body held whole: read them whole. Grants
    /// add up: HTTP/2 streams share their connection's reads.
    pub fn grant(&self, bytes: u64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| Some(left.saturating_add(bytes)));
    }

    /// Whether bytes are granted now.
    fn granted(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }

    /// A read brought `n` bytes: they count against what is granted.
    fn spend(&self, n: usize) {
        let n = n as u64;
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| (left > 0).then(|| left.saturating_sub(n)));
    }
}

/// The speed measurement of one connection.
#[derive(Debug, Clone, Copy)]
struct Speed {
    window_start: Instant,
    bytes: u64,
    /// The most one read may bring (`None`: fast, no limit).
    limit: Option<usize>,
    /// A window closed since the connection was new (or idle).
    settled: bool,
}

impl Speed {
    fn new(now: Instant) -> Speed {
        Speed { window_start: now, bytes: 0, limit: None, settled: false }
    }

    /// The most one read may bring at `now` (`None`: no limit). A window that ran out
    /// while nothing was read is closed first.
    fn read_limit(&mut self, now: Instant) -> Option<usize> {
        self.record(0, now);
        self.limit
    }

    /// A read brought `n` bytes at `now`.
    fn record(&mut self, n: usize, now: Instant) {
        self.bytes = self.bytes.saturating_add(n as u64);
        let elapsed = now.saturating_duration_since(self.window_start);
        let window = if self.limit.is_none() && self.settled { SLOW_WINDOW } else { WINDOW };
        if elapsed < window {
            return;
        }
        if self.bytes == 0 {
            // Idle (in the pool): what comes next is a new transfer of unknown speed.
            *self = Speed::new(now);
            return;
        }
        let rate = self.bytes.saturating_mul(1000) / (elapsed.as_millis().max(1) as u64);
        let limit = (rate < FAST).then(|| usize::try_from(rate / 1000).unwrap_or(usize::MAX).max(SLOW_READ));
        if limit.is_some() != self.limit.is_some() {
            tracing::trace!(rate, ?limit, "read size follows the connection's speed");
        }
        *self = Speed { window_start: now, bytes: 0, limit, settled: true };
    }
}

impl<T: Read + Unpin> Read for SpeedSized<T> {
    // hyper's cursor cannot be lent for part of its room and then told how much was filled
    // but through its unsafe pair `as_mut`/`advance`, which hyper itself uses this way.
    #[allow(unsafe_code)]
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // One clock read per call: the inner read does not block.
        let now = Instant::now();
        let limit = this.speed.read_limit(now).filter(|_| !this.allowance.granted());
        let room = buf.remaining().min(limit.unwrap_or(usize::MAX));
        // SAFETY: nothing here uninitializes a byte: `ReadBuf` only lets the inner read
        // write into the slice.
        let unfilled = unsafe { buf.as_mut() };
        let mut piece = ReadBuf::uninit(unfilled.get_mut(..room).unwrap_or_default());
        let polled = Pin::new(&mut this.inner).poll_read(cx, piece.unfilled());
        if let Poll::Ready(Ok(())) = &polled {
            let n = piece.filled().len();
            // SAFETY: `filled` counts bytes the inner read wrote (initialized) at the start
            // of the cursor's room, in order.
            unsafe { buf.advance(n) };
            this.speed.record(n, now);
            this.allowance.spend(n);
        }
        polled
    }
}

impl<T: Write + Unpin> Write for SpeedSized<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

impl<T: Connection> Connection for SpeedSized<T> {
    fn connected(&self) -> Connected {
        // hyper-util copies a connection's extras into each of its responses.
        self.inner.connected().extra(self.allowance.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn a_new_connection_is_fast_until_its_first_window_says_otherwise() {
        let t0 = Instant::now();
        let mut s = Speed::new(t0);
        assert_eq!(s.read_limit(t0), None, "a small file reads whole");
        // 64 KiB in 100 ms: 640 KiB/s, slow: the least piece.
        s.record(64 << 10, t0 + WINDOW);
        assert_eq!(s.read_limit(t0 + WINDOW), Some(SLOW_READ));
    }

    #[test]
    fn a_slow_connection_turns_fast_in_one_window_and_back_only_after_a_long_one() {
        let t0 = Instant::now();
        let mut s = Speed::new(t0);
        s.record(64 << 10, t0 + WINDOW);
        // 8 MiB in 100 ms: 80 MiB/s.
        let t1 = t0 + WINDOW;
        s.record(8 << 20, t1 + WINDOW);
        assert_eq!(s.read_limit(t1 + WINDOW), None);
        // A pause while the writer catches up (1.5 s with a few bytes) does not make it slow ...
        let t2 = t1 + WINDOW;
        s.record(4096, t2 + Duration::from_millis(1500));
        assert_eq!(s.read_limit(t2 + Duration::from_millis(1500)), None);
        // ... a whole slow window does: 10 MiB/s reads 10 KiB at a time (a millisecond's worth).
        s.record(20 << 20, t2 + SLOW_WINDOW);
        assert_eq!(s.read_limit(t2 + SLOW_WINDOW), Some(((20 << 20) + 4096) / 2 / 1000));
    }

    #[test]
    fn a_connection_idle_in_the_pool_is_new_again() {
        let t0 = Instant::now();
        let mut s = Speed::new(t0);
        s.record(64 << 10, t0 + WINDOW);
        assert_eq!(s.read_limit(t0 + WINDOW), Some(SLOW_READ));
        assert_eq!(s.read_limit(t0 + WINDOW + Duration::from_secs(30)), None);
    }

    async fn read_once<T: Read + Unpin>(io: &mut T, room: usize) -> usize {
        let mut storage = vec![0u8; room];
        let mut buf = ReadBuf::new(&mut storage);
        std::future::poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, buf.unfilled())).await.unwrap();
        buf.filled().len()
    }

    /// A loopback connection read through `SpeedSized`, and its server end.
    async fn connected() -> (SpeedSized<hyper_util::rt::TokioIo<tokio::net::TcpStream>>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (SpeedSized::new(hyper_util::rt::TokioIo::new(client)), server)
    }

    #[tokio::test]
    async fn a_slow_connection_reads_in_small_pieces_and_a_fast_one_does_not() {
        let (mut io, mut server) = connected().await;
        server.write_all(&[7u8; 64 << 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Known slow: a small piece.
        io.speed = Speed { limit: Some(SLOW_READ), settled: true, ..Speed::new(Instant::now()) };
        let first = read_once(&mut io, 64 << 10).await;
        assert!(first > 0 && first <= SLOW_READ, "{first}");
        // Known fast: one read takes all that is there.
        io.speed = Speed { limit: None, settled: true, ..Speed::new(Instant::now()) };
        let n = read_once(&mut io, 64 << 10).await;
        assert_eq!(n, (64 << 10) - first);
    }

    #[tokio::test]
    async fn a_granted_body_reads_whole_on_a_slow_connection() {
        let (mut io, mut server) = connected().await;
        io.speed = Speed { limit: Some(SLOW_READ), settled: true, ..Speed::new(Instant::now()) };
        // The engine finds the allowance in a response's extensions.
        let mut extensions = http::Extensions::new();
        io.connected().get_extras(&mut extensions);
        let allowance = extensions.get::<ReadAllowance>().unwrap().clone();
        server.write_all(&[7u8; 64 << 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        allowance.grant(40 << 10);
        let whole = read_once(&mut io, 40 << 10).await;
        assert_eq!(whole, 40 << 10, "a granted body reads in one piece");
        // Spent: the slow connection's limit is back.
        let next = read_once(&mut io, 24 << 10).await;
        assert!(next > 0 && next <= SLOW_READ, "{next}");
    }
}
