//! The whole background story in one small program.
//!
//! `quickstart URL...` hands the downloads to dlsessiond and exits at once. When they are
//! done, the daemon relaunches it as `quickstart --collect DIR`; it rejoins the session,
//! moves each file into DIR (the directory the first run was started in) as `download-ID` and exits once
//! every event is handled. With a daemon running (`scripts/quickstart.sh` shows one at work
//! on a transfer of its own): `cargo run -p dlsession --example quickstart --
//! http://127.0.0.1:8080/file`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};

use dlsession::blocking::Session;
use dlsession::{DownloadRequest, DownloadTask, SessionConfiguration, SessionDelegate, TaskError};

/// Moves finished files into its directory.
struct Collect(PathBuf);

impl SessionDelegate for Collect {
    fn did_finish_downloading_to(&self, _: &dlsession::Session, task: &DownloadTask, location: &Path) {
        let to = self.0.join(format!("download-{}", task.id()));
        // The cache may be on another filesystem: then copy (the daemon deletes the original).
        if let Err(e) = std::fs::rename(location, &to).or_else(|_| std::fs::copy(location, &to).map(drop)) {
            eprintln!("cannot move task {}'s file to {}: {e}", task.id(), to.display());
        }
    }

    fn did_complete_with_error(&self, _: &dlsession::Session, task: &DownloadTask, error: Option<&TaskError>) {
        if let Some(e) = error {
            eprintln!("task {} failed: {e}", task.id());
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Relaunched by the daemon as `quickstart --collect DIR`.
    let collect_into = args.first().filter(|a| *a == "--collect").and(args.get(1)).map(PathBuf::from);
    let dir = collect_into.clone().map_or_else(std::env::current_dir, Ok)?;
    let relaunch = [std::env::current_exe()?, "--collect".into(), dir.clone()].map(|p| p.display().to_string());
    let config = SessionConfiguration::background("org.example.quickstart").launch_command(relaunch);
    let session = Session::attach(config, Collect(dir))?;
    if collect_into.is_some() {
        // The delegate hears what finished while this program was away.
        return Ok(session.wait_idle()?);
    }
    let tasks = session.download_tasks(args.iter().map(DownloadRequest::new).collect(), true)?;
    println!("dlsessiond has {} download(s); this program may exit now", tasks.len());
    Ok(())
}
