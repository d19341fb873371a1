//! Rebuilding state at start: sessions, tasks, undelivered events; finishing what a crash
//! interrupted; removing files nothing refers to.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::requests::{host_key, new_session};
use super::{After, Core, Timer};
use crate::engine::files::{MoveError, move_into_place, remove_stale_copies, sync_parent};
use crate::model::{Phase, now_ms};
use crate::store::{Op, Snapshot};
use dlsession_proto::{DurableEvent, ErrorCode, ErrorInfo, TaskId, TaskState};

/// Kept partial files from `cancel_producing_resume_data` live this long.
const RESUME_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Core {
    pub(super) fn restore(&mut self, snapshot: Snapshot) {
        for rec in snapshot.sessions {
            self.next_session_key = self.next_session_key.max(rec.key + 1);
            self.by_identifier.insert(rec.identifier.clone(), rec.key);
            self.sessions.insert(rec.key, new_session(rec));
        }
        for ev in snapshot.events {
            if let Some(s) = self.sessions.get_mut(&ev.session) {
                s.committed = s.committed.max(ev.seq);
                s.events.insert(ev.seq, ev);
            }
        }
        let mut finishing = Vec::new();
        let now = now_ms();
        for rec in snapshot.tasks {
            let id = rec.id;
            let host = url::Url::parse(&rec.url).map(|u| host_key(&u)).unwrap_or_default();
            let (state, phase, retry_at) = (rec.state, rec.phase, rec.retry_at);
            self.insert_task(rec, host);
            if phase == Phase::Finishing && state != TaskState::Completed {
                finishing.push(id);
                continue;
            }
            match state {
                TaskState::Queued | TaskState::Running => self.enqueue(id),
                TaskState::Waiting => {
                    let at = retry_at.unwrap_or(now).max(now);
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.timer = Some(at);
                    }
                    self.set_timer(at, Timer::Retry(id));
                }
                TaskState::Suspended | TaskState::Completed => {}
            }
        }
        let live = self.tasks.len();
        for id in finishing {
            self.recover_finish(id);
        }
        self.collect_garbage();
        let keys: Vec<_> = self.sessions.keys().copied().collect();
        for key in keys {
            self.check_wake(key, Duration::ZERO);
        }
        info!(sessions = self.sessions.len(), tasks = live, "state restored");
    }

    /// A crash hit between "data complete" and "finished committed": finish it now.
    fn recover_finish(&mut self, id: TaskId) {
        let Some(t) = self.tasks.get(&id) else { return };
        let part = self.part_path(&t.rec);
        let (to, overwrite) = match &t.rec.destination {
            Some(d) => (PathBuf::from(d), t.rec.overwrite),
            None => (self.cache_location(&t.rec), true),
        };
        let size = t.rec.committed_offset;
        // A copy across filesystems cut short leaves a temporary file beside the target.
        remove_stale_copies(&to);
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
        let outcome = match (len(&part), len(&to)) {
            // Copied across filesystems and renamed, but the source not yet removed. Only
            // the same bytes prove it: a file that was there before may have the same size.
            // The destination's directory is synced first: the crash may have come between
            // the rename (or copy) and its directory sync, and the cache copy is the only
            // other one.
            (Some(a), Some(b)) if a == size && b == size && !overwrite && same_contents(&part, &to) => {
                sync_parent(&to).map_err(|e| sync_failed(&to, &e)).map(|()| {
                    let _ = std::fs::remove_file(&part);
                })
            }
            (Some(a), _) if a == size => move_into_place(&part, &to, overwrite).map_err(|e| match e {
                MoveError::Exists(p) => format!("destination {} already exists", p.display()),
                e => e.to_string(),
            }),
            // Renamed; whether the rename is durable is not known, so make it so before
            // "completed" is committed.
            (None, Some(b)) if b == size => sync_parent(&to).map_err(|e| sync_failed(&to, &e)),
            // Nothing, or not the complete file: download again.
            _ => Err(String::new()),
        };
        match outcome {
            Ok(()) => {
                info!(task = id, "finished a download interrupted while moving into place");
                self.mark_finished(id, to.to_string_lossy().into_owned());
            }
            Err(e) if e.is_empty() => {
                warn!(task = id, "finished file lost before it was committed; downloading again");
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.rec.phase = Phase::Transfer;
                    t.rec.committed_offset = 0;
                }
                self.set_state(id, TaskState::Queued);
                self.enqueue(id);
                self.save_task(id, Vec::new());
            }
            Err(e) => {
                let mut ops = Vec::new();
                let mut after = Vec::new();
                self.complete(id, Some(ErrorInfo::new(ErrorCode::FileError, e)), &mut ops, &mut after);
                self.commit(ops, after);
            }
        }
    }

    /// The file is in place: commit `finished_downloading` and `completed`.
    pub(super) fn mark_finished(&mut self, id: TaskId, location: String) {
        let now = now_ms();
        let Some(t) = self.tasks.get_mut(&id) else { return };
        t.rec.phase = Phase::Transfer;
        t.rec.location = Some(location.clone());
        t.rec.finished_at = Some(now);
        t.rec.last_error = None;
        t.rec.retry_at = None;
        let key = t.rec.session;
        self.set_state(id, TaskState::Completed);
        let mut ops = Vec::new();
        self.emit(key, DurableEvent::FinishedDownloading { task: id, location }, &mut ops);
        let seq = self.emit(key, DurableEvent::Completed { task: id, error: None }, &mut ops);
        if let Some(t) = self.tasks.get(&id) {
            ops.push(Op::UpdateTask(Box::new(t.rec.clone())));
        }
        let mut after = vec![After::Events { session: key, seq }];
        self.check_invalidation(key, &mut ops, &mut after);
        self.commit(ops, after);
    }

    /// Removes files under the downloads directory that no live task refers to.
    fn collect_garbage(&self) {
        let downloads = self.cfg.downloads_dir();
        let Ok(entries) = std::fs::read_dir(&downloads) else { return };
        let mut removed = 0usize;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "resume" {
                removed += self.clean_resume_dir(&path);
                continue;
            }
            let key = name.strip_prefix('s').and_then(|k| k.parse::<i64>().ok());
            match key {
                Some(key) if self.sessions.contains_key(&key) => removed += self.clean_session_dir(&path),
                Some(_) if std::fs::remove_dir_all(&path).is_ok() => removed += 1,
                _ => {}
            }
        }
        if removed > 0 {
            info!(removed, "removed stray files from the cache directory");
        }
    }

    fn clean_session_dir(&self, dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = match name.split_once('.') {
                Some((id, "part")) => id
                    .parse::<TaskId>()
                    .ok()
                    .and_then(|id| self.tasks.get(&id))
                    .is_some_and(|t| t.state != TaskState::Completed),
                Some((id, "download")) => id
                    .parse::<TaskId>()
                    .ok()
                    .and_then(|id| self.tasks.get(&id))
                    .is_some_and(|t| t.rec.location.as_deref() == path.to_str()),
                _ => false,
            };
            if !keep && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    fn clean_resume_dir(&self, dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut removed = 0;
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > RESUME_RETENTION);
            if old && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Whether two files hold the same bytes (false on any read error).
fn same_contents(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else { return false };
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let Ok(n) = read_full(&mut fa, &mut ba) else { return false };
        let Ok(m) = read_full(&mut fb, &mut bb) else { return false };
        if n != m || ba.get(..n) != bb.get(..m) {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|r| !r.is_empty()) {
        match f.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn sync_failed(to: &Path, e: &std::io::Error) -> String {
    format!("cannot sync the directory of {}: {e}", to.display())
}
