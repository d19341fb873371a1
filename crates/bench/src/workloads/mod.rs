//! The workloads, by name ([`run`]); the test data they share is `data`'s.

mod activation;
mod big_lists;
mod crash;
mod crowd;
mod data;
mod download;
mod events;
mod ipc;
mod limits;
mod many_tasks;
mod rss;
mod small_files;
mod storm;

use anyhow::{Result, bail};

use crate::ctx::Ctx;
use crate::report::Outcome;
pub use data::Data;

pub async fn run(name: &str, ctx: &Ctx, data: &mut Data) -> Result<Outcome> {
    match name {
        "1gib-http" => download::http(ctx, data).await,
        "1gib-https" => download::https(ctx, data).await,
        "small-files" => small_files::run(ctx, data).await,
        "many-tasks" => many_tasks::run(ctx).await,
        "ipc" => ipc::run(ctx).await,
        "event-latency" => events::run(ctx).await,
        "crash-cost" => crash::run(ctx).await,
        "rss-per-download" => rss::run(ctx).await,
        "big-lists" => big_lists::run(ctx).await,
        "bandwidth-limit" => limits::run(ctx).await,
        "activation" => activation::run(ctx).await,
        "relaunch-storm" => storm::run(ctx).await,
        "crowd" => crowd::run(ctx).await,
        other => bail!("unknown workload {other}"),
    }
}
