//! `dlsession-serve [--bind IP[:PORT]] [MIB] [BYTES_PER_SECOND]`: an HTTP server on 127.0.0.1
//! (or IP, on PORT if given) for trying dlsessiond without depending on anyone else's server. It serves `/sample.bin`, MIB
//! mebibytes (default 64) of deterministic content with an `ETag` (so a stopped download
//! resumes), optionally throttled; prints the URL and the content's SHA-256 on one line
//! each, then serves until it is killed.

use std::io::Write as _;

use dlsession_testkit::{Resource, TestServer, pattern_sha256, to_hex};

const SEED: u64 = 2026;

const USAGE: &str = "usage: dlsession-serve [--bind IP[:PORT]] [MIB] [BYTES_PER_SECOND]
serves /sample.bin: MIB mebibytes (default 64) of fixed content with an ETag, on IP
(default 127.0.0.1) and PORT (default: a free one), at BYTES_PER_SECOND (default: as fast as it can);
prints the URL, then the content's SHA-256, then serves until killed";

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dlsession-serve: {e}\n{USAGE}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let mut args = std::env::args().skip(1).peekable();
    let mut bind = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    if args.peek().is_some_and(|a| a == "--bind") {
        args.next();
        let ip = args.next().ok_or_else(|| anyhow::anyhow!("--bind needs an IP address"))?;
        bind = match ip.parse::<std::net::SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => std::net::SocketAddr::new(ip.parse().map_err(|e| anyhow::anyhow!("--bind {ip}: {e}"))?, 0),
        };
    }
    let mib: u64 = match args.next() {
        Some(n) => n.parse().map_err(|e| anyhow::anyhow!("MIB: not a number ({e})"))?,
        None => 64,
    };
    let rate: Option<u64> = match args.next() {
        Some(n) => Some(n.parse().map_err(|e| anyhow::anyhow!("BYTES_PER_SECOND: not a number ({e})"))?),
        None => None,
    };
    let len = mib << 20;
    let server = TestServer::start_at(bind).await?;
    let mut resource = Resource::generated(len, SEED).etag(&format!("\"sample-{mib}\""));
    if let Some(rate) = rate.filter(|r| *r > 0) {
        resource = resource.throttle(rate);
    }
    server.add("/sample.bin", resource);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", server.url("/sample.bin"))?;
    writeln!(out, "{}", to_hex(&pattern_sha256(SEED, len)))?;
    out.flush()?;
    drop(out);
    std::future::pending::<()>().await;
    Ok(())
}
