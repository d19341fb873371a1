//! What every workload gets: the sizes to run at, the tools, the scratch space, nginx.

use std::path::PathBuf;

use dlsession_testkit::TestCa;

use crate::nginx::Nginx;

/// Sizes of every workload (the full run's, or `--quick`'s).
#[derive(Debug, Clone)]
pub struct Sizes {
    pub big: u64,
    pub small_count: usize,
    pub small_size: usize,
    /// Task counts of the many-tasks growth table; the last one is the headline.
    pub many_tasks: Vec<usize>,
    /// URLs (and finished tasks) of big-lists.
    pub big_lists: usize,
    pub ipc_requests: usize,
    pub event_downloads: usize,
    pub event_size: usize,
    pub crash_size: u64,
    /// Throttle of the crash-cost download, bytes per second.
    pub crash_rate: u64,
    pub rss_downloads: usize,
    pub idle_secs: u64,
    /// Sessions of relaunch-storm, each relaunching its app.
    pub storm_sessions: usize,
    /// Tasks of crowd, started at once.
    pub crowd_tasks: usize,
}

/// Everything the workloads share.
#[derive(Debug)]
pub struct Ctx {
    pub runs: usize,
    pub quick: bool,
    pub sizes: Sizes,
    pub daemon_bin: PathBuf,
    pub ctl_bin: PathBuf,
    pub time_bin: PathBuf,
    pub curl: Option<PathBuf>,
    pub wget2: Option<PathBuf>,
    pub aria2c: Option<PathBuf>,
    /// The scratch directory (removed at the end).
    pub work: PathBuf,
    /// What nginx serves.
    pub www: PathBuf,
    /// `HOME` of the peer tools (so no user configuration applies).
    pub peer_home: PathBuf,
    pub clk_tck: f64,
    pub ca: TestCa,
    pub nginx: Nginx,
}

impl Ctx {
    /// Environment of the peer tools.
    pub fn peer_env(&self) -> Vec<(String, PathBuf)> {
        vec![("HOME".into(), self.peer_home.clone())]
    }
}
