//! `dlsession-serve [MIB] [BYTES_PER_SECOND]`: an HTTP server on 127.0.0.1 for trying
//! dlsessiond without depending on anyone else's server. It serves `/sample.bin`, MIB
//! mebibytes (default 64) of deterministic content with an `ETag` (so a stopped download
//! resumes), optionally throttled; prints the URL and the content's SHA-256 on one line
//! each, then serves until it is killed.

use std::io::Write as _;

use dlsession_testkit::{Resource, TestServer, pattern_sha256, to_hex};

const SEED: u64 = 2026;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = match args.next() {
        Some(n) => n.parse().map_err(|e| anyhow::anyhow!("MIB: not a number ({e})"))?,
        None => 64,
    };
    let rate: Option<u64> = match args.next() {
        Some(n) => Some(n.parse().map_err(|e| anyhow::anyhow!("BYTES_PER_SECOND: not a number ({e})"))?),
        None => None,
    };
    let len = mib << 20;
    let server = TestServer::start().await?;
    let mut resource = Resource::generated(len, SEED).etag(&format!("\"sample-{mib}\""));
    if let Some(rate) = rate {
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
