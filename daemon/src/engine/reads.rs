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
//!
//! A fast connection whose server is the slower side (on two cores, nginx encrypting TLS)
//! woke its reader for every burst the server sent, 16-90 KiB: over 1 GiB of HTTPS about
//! 12,000 wake-ups, each read making the kernel send a window update, which on loopback
//! also runs the sender's side of it. Such a connection asks the kernel (`SO_RCVLOWAT`) to
//! wake it only once about 2 ms' worth (at most [`LOW_WATER_MAX`]) is waiting. That is safe
//! only while so much is sure to come: the engine tells the connection how much of its body
//! is still to come ([`BodyAhead`]), and the mark stays below that minus what the layers
//! above the socket may already hold ([`InFlight`]). A server that falls silent under the
//! mark, or a length that lied, costs at most [`LOW_WATER_WAIT`]: the mark is then lifted and
//! rests for a [`WINDOW`]. 1 GiB over HTTPS: the daemon's CPU about a third
//! lower (BENCHMARKS.md).

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
/// The most a fast connection's low-water mark asks the kernel to gather before a wake-up.
const LOW_WATER_MAX: u64 = 256 << 10;
/// Marks are multiples of this; a smaller one is not worth a system call (the kernel's
/// default, one byte, stays).
const LOW_WATER_STEP: u64 = 32 << 10;
/// A read that waited this long under a mark lifts it.
const LOW_WATER_WAIT: Duration = Duration::from_millis(10);

/// Wraps a connector: its connections read in pieces that follow their speed.
#[derive(Debug, Clone)]
pub struct SpeedSizedReads<C> {
    pub connector: C,
    pub in_flight: InFlight,
}

/// The most of a body's bytes the layers above a connection's socket may hold (hyper's
/// read buffer and the frame on its way, or an HTTP/2 stream's receive window; TLS's
/// records): bytes read from the socket that the engine has not counted yet.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    pub http1: u64,
    pub http2: u64,
}

impl<C> tower_service::Service<Uri> for SpeedSizedReads<C>
where
    C: tower_service::Service<Uri>,
    C::Response: Connection,
    C::Future: Send + 'static,
{
    type Response = SpeedSized<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connector.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.connector.call(dst);
        let in_flight = self.in_flight;
        Box::pin(async move {
            connecting.await.map(|io| {
                let held = if io.connected().is_negotiated_h2() { in_flight.http2 } else { in_flight.http1 };
                SpeedSized::new(io, held)
            })
        })
    }
}

/// A connection whose reads follow its speed (see the module).
#[derive(Debug)]
pub struct SpeedSized<T> {
    inner: T,
    speed: Speed,
    allowance: ReadAllowance,
    ahead: BodyAhead,
    low: LowWater,
}

impl<T> SpeedSized<T> {
    fn new(inner: T, in_flight: u64) -> SpeedSized<T> {
        SpeedSized {
            inner,
            speed: Speed::new(Instant::now()),
            allowance: ReadAllowance::default(),
            ahead: BodyAhead::default(),
            low: LowWater { set: 1, asked: 1, in_flight, ..LowWater::default() },
        }
    }
}

/// The TCP socket under a connection, for its low-water mark.
pub trait TcpSocket {
    fn tcp_socket(&self) -> Option<BorrowedFd<'_>>;
}

impl<T: TcpSocket> TcpSocket for hyper_rustls::MaybeHttpsStream<T> {
    fn tcp_socket(&self) -> Option<BorrowedFd<'_>> {
        match self {
            hyper_rustls::MaybeHttpsStream::Http(io) => io.tcp_socket(),
            hyper_rustls::MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().tcp_socket(),
        }
    }
}

impl TcpSocket for hyper_util::rt::TokioIo<tokio::net::TcpStream> {
    fn tcp_socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.inner().as_fd())
    }
}

/// Bytes of the current body the engine still expects over a connection (0: none known).
/// Every response of the connection carries a clone in its extensions.
#[derive(Debug, Clone, Default)]
pub struct BodyAhead(Arc<AheadCount>);

#[derive(Debug, Default)]
struct AheadCount {
    bytes: AtomicU64,
    /// Bodies being read on the connection (HTTP/2 streams share it): with more than one,
    /// none of them says what the socket will bring, so nothing counts as sure.
    bodies: AtomicU32,
}

impl BodyAhead {
    /// A body that ends at offset `end` is read; the guard is told how far it got and
    /// clears the count when dropped.
    pub fn track(&self, end: u64) -> AheadGuard {
        self.0.bodies.fetch_add(1, Ordering::Relaxed);
        AheadGuard { ahead: self.clone(), end: Some(end) }
    }

    /// A body of unknown length (chunked, or an upload's answer) is read: while it lasts,
    /// nothing on the connection is sure to come, so another body beside it on an HTTP/2
    /// connection sets no mark that would hold this one's bytes back.
    pub fn track_unsized(&self) -> AheadGuard {
        self.0.bodies.fetch_add(1, Ordering::Relaxed);
        self.0.bytes.store(0, Ordering::Relaxed);
        AheadGuard { ahead: self.clone(), end: None }
    }

    fn get(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }
}

/// Keeps a connection's [`BodyAhead`] while one body is read.
#[derive(Debug)]
pub struct AheadGuard {
    ahead: BodyAhead,
    /// Where the body ends (`None`: unknown).
    end: Option<u64>,
}

impl AheadGuard {
    /// The engine has the body up to `offset`.
    pub fn at(&self, offset: u64) {
        let count = &self.ahead.0;
        if let Some(end) = self.end
            && count.bodies.load(Ordering::Relaxed) == 1
        {
            count.bytes.store(end.saturating_sub(offset), Ordering::Relaxed);
            // Another body may have started in between: then nothing is sure.
            if count.bodies.load(Ordering::Relaxed) == 1 {
                return;
            }
        }
        count.bytes.store(0, Ordering::Relaxed);
    }

    /// Nothing is sure to come at the socket's pace (the body is paced by a bandwidth limit:
    /// a frame waits above the socket, uncounted, while it is paced).
    pub fn unsure(&self) {
        self.ahead.0.bytes.store(0, Ordering::Relaxed);
    }
}

impl Drop for AheadGuard {
    fn drop(&mut self) {
        self.ahead.0.bodies.fetch_sub(1, Ordering::Relaxed);
        self.ahead.0.bytes.store(0, Ordering::Relaxed);
    }
}

/// Whether this kernel signals a socket readable when its low-water mark is lowered
/// under what waits (Linux 4.18 and later, `tcp_set_rcvlowat`). Without that, lifting a
/// mark would not wake the read (tokio's readiness is edge-triggered): no marks at all.
fn marks_can_be_lifted() -> bool {
    static LIFTABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LIFTABLE.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let liftable = kernel_at_least(&release, (4, 18));
        if !liftable {
            tracing::debug!(release = release.trim(), "no low-water marks: the kernel cannot lift them");
        }
        liftable
    })
}

/// Whether a kernel release string (`6.18.44-fc`) is `min` or later; false when unreadable.
fn kernel_at_least(release: &str, min: (u64, u64)) -> bool {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u64>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u64>().ok());
    matches!((major, minor), (Some(major), Some(minor)) if (major, minor) >= min)
}

/// A connection's low-water mark (see the module).
#[derive(Debug, Default)]
struct LowWater {
    /// The mark on the socket (1: the kernel's default).
    set: u64,
    /// The mark last asked for (the receive buffer may have made `set` smaller).
    asked: u64,
    /// See [`InFlight`].
    in_flight: u64,
    /// Lifts a mark a read waited under too long; armed while such a read waits.
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the timer was armed for the read now waiting.
    armed: Option<Instant>,
    /// A mark the receive buffer made smaller is asked for again from then on.
    retry_at: Option<Instant>,
    /// After a lifted mark, none before this.
    rest_until: Option<Instant>,
    /// The socket refused a mark: none again.
    refused: bool,
}

impl LowWater {
    /// The mark a read may wait for now: about 2 ms' worth at the connection's last measured
    /// speed, no more than is sure to come, at most [`LOW_WATER_MAX`] (1: none).
    fn wanted(&self, speed: &Speed, ahead: u64, granted: bool, now: Instant) -> u64 {
        let resting = self.rest_until.is_some_and(|t| now < t);
        if self.refused || granted || resting || speed.limit.is_some() || !marks_can_be_lifted() {
            return 1;
        }
        let sure = ahead.saturating_sub(self.in_flight);
        let mark = (speed.rate / 500).min(sure).min(LOW_WATER_MAX) / LOW_WATER_STEP * LOW_WATER_STEP;
        mark.max(1)
    }

    /// Whether a read has waited [`LOW_WATER_WAIT`] under the mark (the timer wakes it).
    fn waited_too_long(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let wait = self.wait.get_or_insert_with(|| Box::pin(tokio::time::sleep(LOW_WATER_WAIT)));
        // Armed long before (hyper stopped reading while its writer caught up, and the timer
        // ran out unseen): this wait starts now.
        if self.armed.is_none_or(|at| now.saturating_duration_since(at) > 2 * LOW_WATER_WAIT) {
            wait.as_mut().reset(tokio::time::Instant::now() + LOW_WATER_WAIT);
            self.armed = Some(now);
        }
        if wait.as_mut().poll(cx).is_ready() {
            self.armed = None;
            return true;
        }
        false
    }

    /// Sets the socket's mark to `mark`. A raised mark that cannot be lowered again would
    /// hold back what waits under it: that is an error (the attempt fails and is retried on
    /// another connection); a mark that cannot be raised only means none.
    fn apply(&mut self, socket: Option<BorrowedFd<'_>>, mark: u64, now: Instant) -> io::Result<()> {
        if mark == self.asked && self.retry_at.is_none_or(|at| now < at) {
            return Ok(());
        }
        self.asked = mark;
        self.retry_at = None;
        let result = match socket {
            None => Err(io::Error::other("no socket")),
            // Not past a quarter of the receive buffer: a larger mark would make the kernel
            // clamp the connection's window to it.
            Some(socket) if mark > 1 => {
                rustix::net::sockopt::socket_recv_buffer_size(socket).map_err(io::Error::from).and_then(|buffer| {
                    let mark = mark.min(buffer as u64 / 4 / LOW_WATER_STEP * LOW_WATER_STEP).max(1);
                    set_receive_low_water(socket, mark).map(|()| mark)
                })
            }
            Some(socket) => set_receive_low_water(socket, 1).map(|()| 1),
        };
        match result {
            Ok(applied) => {
                self.set = applied;
                self.armed = None;
                // The buffer grows as the connection runs (the kernel tunes it).
                if applied < mark {
                    self.retry_at = Some(now + WINDOW);
                }
                Ok(())
            }
            Err(e) if self.set > 1 => {
                self.refused = true;
                Err(io::Error::other(format!("the socket's low-water mark cannot be lowered: {e}")))
            }
            Err(e) => {
                tracing::debug!(error = %e, "the socket takes no low-water mark");
                self.refused = true;
                Ok(())
            }
        }
    }
}

/// `SO_RCVLOWAT`: the socket counts as readable once this many bytes wait (or it ended).
/// Lowering it signals the socket readable at once when enough waits.
#[allow(unsafe_code)]
fn set_receive_low_water(socket: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the option value is a c_int that lives through the call, its size passed
    // with it; `socket` is a descriptor the connection keeps open.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
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
    /// Bytes per second over the last closed window (0: none closed yet, so a new
    /// connection sets no low-water mark).
    rate: u64,
}

impl Speed {
    fn new(now: Instant) -> Speed {
        Speed { window_start: now, bytes: 0, limit: None, settled: false, rate: 0 }
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
        *self = Speed { window_start: now, bytes: 0, limit, settled: true, rate };
    }
}

impl<T: Read + TcpSocket + Unpin> Read for SpeedSized<T> {
    // hyper's cursor cannot be lent for part of its room and then told how much was filled
    // but through its unsafe pair `as_mut`/`advance`, which hyper itself uses this way.
    #[allow(unsafe_code)]
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, mut buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // One clock read per call: the inner read does not block.
        let now = Instant::now();
        let granted = this.allowance.granted();
        let limit = this.speed.read_limit(now).filter(|_| !granted);
        let mark = this.low.wanted(&this.speed, this.ahead.get(), granted, now);
        if let Err(e) = this.low.apply(this.inner.tcp_socket(), mark, now) {
            return Poll::Ready(Err(e));
        }
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
            this.low.armed = None;
        } else if polled.is_pending() && this.low.set > 1 && this.low.waited_too_long(cx, now) {
            // The server fell silent under the mark (or the body is shorter than announced):
            // lifted, what waits is read now (lowering the mark signals it), and no mark is
            // set again for a while.
            this.low.rest_until = Some(now + WINDOW);
            if let Err(e) = this.low.apply(this.inner.tcp_socket(), 1, now) {
                return Poll::Ready(Err(e));
            }
            cx.waker().wake_by_ref();
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
        self.inner.connected().extra(self.allowance.clone()).extra(self.ahead.clone())
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
        // A receive buffer that allows marks on any kernel (older ones start at 85 KiB).
        rustix::net::sockopt::set_socket_recv_buffer_size(&client, 1 << 20).unwrap();
        (SpeedSized::new(hyper_util::rt::TokioIo::new(client), 0), server)
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

    /// The socket's `SO_RCVLOWAT`.
    #[allow(unsafe_code)]
    fn low_water_of<T: TcpSocket>(io: &SpeedSized<T>) -> u64 {
        use std::os::fd::AsRawFd;
        let fd = io.inner.tcp_socket().unwrap().as_raw_fd();
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: value and len live through the call; len is value's size.
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, std::ptr::from_mut(&mut value).cast(), &mut len)
        };
        assert_eq!(rc, 0);
        u64::try_from(value).unwrap()
    }

    /// The largest mark the socket's receive buffer allows (a quarter of it, in steps).
    fn buffer_cap<T: TcpSocket>(io: &SpeedSized<T>) -> u64 {
        let buffer = rustix::net::sockopt::socket_recv_buffer_size(io.inner.tcp_socket().unwrap()).unwrap() as u64;
        let cap = buffer / 4 / LOW_WATER_STEP * LOW_WATER_STEP;
        assert!(cap >= LOW_WATER_STEP, "a receive buffer of {buffer} allows no mark");
        cap
    }

    /// Known fast (600 MB/s: 2 ms' worth is past the cap).
    fn fast() -> Speed {
        Speed { limit: None, settled: true, rate: 600_000_000, ..Speed::new(Instant::now()) }
    }

    /// Polls one read and says whether it brought anything (`None`: it waits).
    async fn poll_once<T: Read + TcpSocket + Unpin>(io: &mut SpeedSized<T>) -> Option<usize> {
        let mut storage = vec![0u8; 1 << 20];
        let mut buf = ReadBuf::new(&mut storage);
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *io).poll_read(cx, buf.unfilled()))).await;
        match polled {
            Poll::Ready(r) => {
                r.unwrap();
                Some(buf.filled().len())
            }
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_fast_connection_waits_for_a_worthwhile_read_while_enough_is_sure_to_come() {
        let (mut io, _server) = connected().await;
        io.low.in_flight = 1 << 20;
        io.speed = fast();
        let end = 100u64 << 20;
        let body = io.ahead.track(end);
        body.at(0);
        let full = LOW_WATER_MAX.min(buffer_cap(&io));
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), full, "the mark is set");
        // Near the end less is sure to come: a smaller mark (in steps), then none.
        body.at(end - (1 << 20) - 40_000);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), LOW_WATER_STEP);
        body.at(end - (1 << 20) - 1000);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), 1);
        // Two bodies at once on the connection (HTTP/2 streams): neither says what is sure.
        body.at(0);
        let other = io.ahead.track(end);
        other.at(0);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), 1, "two bodies, no mark");
        drop(other);
        // A body of unknown length beside it (a chunked HTTP/2 stream) is not held back either.
        body.at(0);
        let unsized_body = io.ahead.track_unsized();
        body.at(0);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), 1, "a body of unknown length beside it, no mark");
        unsized_body.at(5000);
        body.at(0);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), 1, "still no mark");
        drop(unsized_body);
        // The body's end clears what is ahead: the connection's next answer reads at once.
        body.at(0);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), full);
        drop(body);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), 1, "nothing ahead, no mark");
    }

    #[tokio::test]
    async fn a_read_waiting_under_the_mark_too_long_lifts_it_and_reads_what_is_there() {
        let (mut io, mut server) = connected().await;
        io.speed = fast();
        let _body = io.ahead.track(100 << 20);
        _body.at(0);
        // Less than the mark, then the server falls silent.
        server.write_all(&[7u8; 1000]).await.unwrap();
        let began = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), read_once(&mut io, 1 << 20)).await;
        assert_eq!(n.expect("a silent server under the mark stalls the read"), 1000);
        assert!(began.elapsed() >= LOW_WATER_WAIT, "read at once: no mark was set ({:?})", began.elapsed());
        assert_eq!(low_water_of(&io), 1, "lifted");
        // It rests a while: no mark is set again before then.
        let rest = io.low.rest_until.expect("a lifted mark rests");
        assert!(rest > began && rest <= Instant::now() + WINDOW);
        assert_eq!(io.low.wanted(&io.speed, io.ahead.get(), false, rest - Duration::from_millis(1)), 1);
        assert!(io.low.wanted(&io.speed, io.ahead.get(), false, rest) > 1, "after the rest, marks again");
    }

    #[tokio::test]
    async fn slow_new_and_granted_connections_set_no_mark() {
        let (mut io, _server) = connected().await;
        let _body = io.ahead.track(100 << 20);
        _body.at(0);
        // New: its speed is not known yet.
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), 1);
        // Slow.
        io.speed = Speed { limit: Some(SLOW_READ), settled: true, rate: 16 << 20, ..Speed::new(Instant::now()) };
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), 1);
        // A body held whole.
        io.speed = fast();
        io.allowance.grant(1000);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), 1);
        // Fast, nothing granted: the mark (so the cases above were not refused by the socket).
        io.allowance.spend(1000);
        assert_eq!(poll_once(&mut io).await, None);
        assert_eq!(low_water_of(&io), LOW_WATER_MAX.min(buffer_cap(&io)));
    }

    #[test]
    fn a_mark_that_cannot_be_lowered_is_an_error_and_one_that_cannot_be_raised_is_none() {
        let mut low = LowWater { set: 1, asked: 1, ..LowWater::default() };
        assert!(low.apply(None, LOW_WATER_MAX, Instant::now()).is_ok(), "no mark holds nothing back");
        assert!(low.refused && low.set == 1);
        let mut low = LowWater { set: LOW_WATER_MAX, asked: LOW_WATER_MAX, ..LowWater::default() };
        assert!(
            low.apply(None, 1, Instant::now()).is_err(),
            "a mark left in place would hold back what waits under it"
        );
    }

    #[tokio::test]
    async fn a_mark_the_receive_buffer_made_smaller_is_asked_for_again_later() {
        let (io, _server) = connected().await;
        let socket = io.inner.tcp_socket().unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(socket, 64 << 10).unwrap();
        let small = buffer_cap(&io);
        assert!(small < LOW_WATER_MAX, "a buffer of 64 KiB allows {small}");
        let mut low = LowWater { set: 1, asked: 1, ..LowWater::default() };
        let t0 = Instant::now();
        low.apply(Some(socket), LOW_WATER_MAX, t0).unwrap();
        assert_eq!((low.set, low_water_of(&io)), (small, small));
        rustix::net::sockopt::set_socket_recv_buffer_size(socket, 1 << 20).unwrap();
        low.apply(Some(socket), LOW_WATER_MAX, t0 + WINDOW / 2).unwrap();
        assert_eq!(low.set, small, "not asked again at once");
        low.apply(Some(socket), LOW_WATER_MAX, t0 + WINDOW).unwrap();
        assert_eq!((low.set, low_water_of(&io)), (LOW_WATER_MAX, LOW_WATER_MAX), "asked again: the buffer grew");
    }

    #[test]
    fn marks_need_a_kernel_that_can_lift_them() {
        assert!(kernel_at_least("6.18.44-fc-v1272\n", (4, 18)));
        assert!(kernel_at_least("4.18.0-553.el8_10.x86_64", (4, 18)));
        assert!(kernel_at_least("5.4.0", (4, 18)));
        assert!(!kernel_at_least("4.15.0-213-generic", (4, 18)));
        assert!(!kernel_at_least("3.10.0-1160.el7.x86_64", (4, 18)));
        assert!(!kernel_at_least("", (4, 18)));
        assert!(!kernel_at_least("garbage", (4, 18)));
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
