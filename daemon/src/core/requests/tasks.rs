//! Creating tasks: from specs, and from resume data. Each request is checked first,
//! then its destinations (and a kept file) on a blocking thread, then created in one commit.

use tracing::debug;

use super::{Answer, Creating, DiskCheck, Handled, in_batch};
use crate::conn::ConnId;
use crate::core::creations;
use crate::core::disk::{self, Adoption, Prepared};
use crate::core::resume::ResumeData;
use crate::core::sched::host_key;
use crate::core::task::OffLanes;
use crate::core::{After, Core, CoreMsg};
use crate::model::{SessionKey, TaskRecord, Upload, now_ms};
use crate::store::Op;
use crate::validate;
use dlsession_proto::{CreateRequest, ErrorCode, ErrorInfo, Request, Response, TaskId, TaskSpec, UploadSpec};

impl Core {
    pub(super) fn create_tasks(
        &mut self,
        conn: ConnId,
        id: u64,
        identifier: String,
        specs: Vec<TaskSpec>,
        how: Creating,
        check: DiskCheck,
    ) -> Handled {
        let key = self.open_for_tasks(&identifier)?;
        self.within_batch_limit(specs.len(), "tasks")?;
        let mut hosts = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let url = validate::task(spec, &self.cfg.limits, &self.own).map_err(|e| in_batch(i, specs.len(), e))?;
            hosts.push(host_key(&url));
        }
        dlsession_proto::validate::distinct_destinations(specs.iter().filter_map(|s| s.destination.as_deref()))?;
        if matches!(check, DiskCheck::Pending) {
            let n = specs.len();
            let dests: Vec<(usize, String, bool)> = specs
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.destination.clone().map(|d| (i, d, s.overwrite)))
                .collect();
            if !dests.is_empty() {
                let request = how.request(Request::CreateTasks { identifier, tasks: specs, resume: how.resume });
                let paths = dests.iter().map(|(_, d, _)| d.into()).collect();
                let own = self.own.clone();
                self.check_on_disk(conn, id, request, paths, move || {
                    dests.into_iter().try_for_each(|(i, dest, overwrite)| {
                        disk::destination_on_disk(&dest, overwrite, &own).map_err(|e| in_batch(i, n, e))
                    })?;
                    Ok(Prepared { resume: None, uploads: Vec::new(), client_cert: None })
                });
                return Ok(Answer::Later);
            }
        }
        let now = now_ms();
        let file_mode = self.conns.file_mode(conn);
        let made = specs
            .into_iter()
            .zip(hosts)
            .map(|(spec, host)| move |id| (TaskRecord::new(id, key, spec, now, file_mode), host));
        self.insert_created(conn, id, key, made, how, now);
        Ok(Answer::Later)
    }

    /// Adds tasks made by `made` (each given its new id) in one commit, queued when
    /// `resume`, with the key they were created `once` under; the request is answered
    /// with their ids once they are durable.
    fn insert_created<F: FnOnce(TaskId) -> (TaskRecord, String)>(
        &mut self,
        conn: ConnId,
        request: u64,
        key: SessionKey,
        made: impl ExactSizeIterator<Item = F>,
        how: Creating,
        now: u64,
    ) {
        let mut ops = Vec::with_capacity(made.len() + 1);
        let mut ids = Vec::with_capacity(made.len());
        for make in made {
            let id = self.tasks.allocate();
            let (rec, host) = make(id);
            self.add_created(rec, host, how.resume, now, &mut ops);
            ids.push(id);
        }
        debug!(session = %self.sessions.identifier(key), count = ids.len(), "tasks created");
        self.commit_created(conn, request, key, ids, how.once, now, ops);
    }

    /// Adds one new task (its id allocated): off the lanes until its creation is durable
    /// (`on_created`), queued when `resume`; its row goes into `ops`.
    fn add_created(&mut self, rec: TaskRecord, host: String, resume: bool, now: u64, ops: &mut Vec<Op>) {
        let id = rec.id;
        self.insert_task(rec, host);
        if let Some(t) = self.tasks.get_mut(&id) {
            t.off_lanes = Some(OffLanes::Creating);
        }
        if resume {
            self.make_queued(id, now);
        }
        if let Some(t) = self.tasks.get(&id) {
            ops.push(Op::InsertTask(Box::new(t.rec.clone())));
        }
    }

    /// Commits new tasks `ids` (their rows in `ops`) with the next id and the key they were
    /// created `once` under: the request is answered with their ids once they are durable,
    /// and they may start then.
    #[allow(clippy::too_many_arguments)]
    fn commit_created(
        &mut self,
        conn: ConnId,
        request: u64,
        key: SessionKey,
        ids: Vec<TaskId>,
        once: Option<u128>,
        now: u64,
        mut ops: Vec<Op>,
    ) {
        ops.push(Op::SetNextTaskId(self.tasks.next_id()));
        if let Some(c) = once.and_then(|once| creations::record(key, once, &ids, now)) {
            self.creations.add(c);
            ops.push(Op::SaveCreation(c));
        }
        let reply = After::Reply { conn, id: request, response: Response::TasksCreated(ids.clone()) };
        self.commit(ops, vec![After::Created(ids), reply]);
    }

    pub(super) fn create_from_resume_data(
        &mut self,
        conn: ConnId,
        id: u64,
        identifier: String,
        blob: Vec<u8>,
        how: Creating,
        check: DiskCheck,
    ) -> Handled {
        let key = self.open_for_tasks(&identifier)?;
        let data = ResumeData::decode(&blob)?;
        let spec = data.spec();
        let url = validate::task(&spec, &self.cfg.limits, &self.own)?;
        let (task_id, adoption) = match check {
            DiskCheck::Done(Prepared { resume: Some(prepared), .. }) => prepared,
            DiskCheck::Pending if spec.destination.is_none() && data.kept_file().is_none() => {
                (self.tasks.allocate(), Adoption::None)
            }
            DiskCheck::Done(Prepared { resume: None, .. }) => (self.tasks.allocate(), Adoption::None),
            DiskCheck::Pending => {
                // The destination is checked, then the kept file linked to the new task's
                // partial file, off this thread; the request comes back with the outcome.
                let task_id = self.tasks.allocate();
                let kept = data.kept_file().map(|f| self.resume_dir().join(f));
                let part = self.session_dir(key).join(format!("{task_id}.part"));
                let dest = spec.destination.clone().map(|d| (d, spec.overwrite));
                let request = how.request(Request::CreateTaskFromResumeData {
                    identifier,
                    resume_data: blob,
                    resume: how.resume,
                });
                let paths = dest.iter().map(|(d, _)| d.into()).chain(kept.clone()).collect();
                let own = self.own.clone();
                self.check_on_disk(conn, id, request, paths, move || {
                    if let Some((dest, overwrite)) = dest {
                        disk::destination_on_disk(&dest, overwrite, &own)?;
                    }
                    let adoption = match kept {
                        Some(kept) => disk::adopt(&kept, &part)?,
                        None => Adoption::None,
                    };
                    Ok(Prepared { resume: Some((task_id, adoption)), uploads: Vec::new(), client_cert: None })
                });
                return Ok(Answer::Later);
            }
        };
        let now = now_ms();
        let mut rec = TaskRecord::new(task_id, key, spec, now, self.conns.file_mode(conn));
        if adoption != Adoption::None {
            data.continue_in(&mut rec);
        }
        let mut ops = Vec::new();
        self.add_created(rec, host_key(&url), how.resume, now, &mut ops);
        self.commit_created(conn, id, key, vec![task_id], how.once, now, ops);
        Ok(Answer::Later)
    }

    /// Creates upload tasks: each request checked, then each file (a regular file we can
    /// read, its size and modification time noted) on a blocking thread, then all in one
    /// commit.
    pub(super) fn create_uploads(
        &mut self,
        conn: ConnId,
        id: u64,
        identifier: String,
        uploads: Vec<UploadSpec>,
        how: Creating,
        check: DiskCheck,
    ) -> Handled {
        let key = self.open_for_tasks(&identifier)?;
        self.within_batch_limit(uploads.len(), "uploads")?;
        let n = uploads.len();
        let mut hosts = Vec::with_capacity(n);
        for (i, spec) in uploads.iter().enumerate() {
            let url = validate::upload(spec, &self.cfg.limits, &self.own).map_err(|e| in_batch(i, n, e))?;
            hosts.push(host_key(&url));
        }
        let snapshots = match check {
            DiskCheck::Done(Prepared { uploads: snapshots, .. }) if snapshots.len() == n => snapshots,
            _ => {
                let files: Vec<String> = uploads.iter().map(|u| u.file.clone()).collect();
                let request = how.request(Request::CreateUploads { identifier, uploads, resume: how.resume });
                let paths = files.iter().map(Into::into).collect();
                self.check_on_disk(conn, id, request, paths, move || {
                    let uploads = files
                        .iter()
                        .enumerate()
                        .map(|(i, f)| disk::upload_file(f).map_err(|e| in_batch(i, n, e)))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Prepared { resume: None, uploads, client_cert: None })
                });
                return Ok(Answer::Later);
            }
        };
        let now = now_ms();
        let file_mode = self.conns.file_mode(conn);
        let made = uploads.into_iter().zip(hosts).zip(snapshots).map(|((spec, host), snap)| {
            move |id| {
                let mut rec = TaskRecord::new(id, key, spec.request, now, file_mode);
                rec.upload = Some(Upload {
                    method: spec.method,
                    file: spec.file,
                    size: snap.size,
                    mtime_ns: snap.mtime_ns,
                    idempotent: spec.idempotent,
                    resume_url: None,
                    truncated: false,
                    in_flight: false,
                });
                (rec, host)
            }
        });
        self.insert_created(conn, id, key, made, how, now);
        Ok(Answer::Later)
    }

    /// A request sent `Once` whose key its session created tasks under already (its answer
    /// was lost and the client sent it again): answered with their ids, once they are
    /// durable, and nothing is created; a file its disk phase adopted goes back. False if
    /// the key is new. Asked again after a disk phase: of two requests with one key that
    /// both went to check files, the second to come back answers the first's ids.
    pub(super) fn answer_created(
        &mut self,
        conn: ConnId,
        id: u64,
        key: u128,
        identifier: &str,
        check: &DiskCheck,
    ) -> bool {
        let Some(ids) = self.sessions.key_of(identifier).ok().and_then(|session| self.creations.get(session, key))
        else {
            return false;
        };
        debug!(session = %identifier, count = ids.len(), "created before under this key: answered again");
        if let DiskCheck::Done(Prepared { resume: Some((_, Adoption::Adopted { kept, part })), .. }) = check {
            self.disk.unadopt(part.clone(), kept.clone());
        }
        let reply = After::Reply { conn, id, response: Response::TasksCreated(ids) };
        self.commit_after_pending(Vec::new(), vec![reply]);
        true
    }

    /// A request that creates tasks, sent under a creation key its session has not used
    /// (see `answer_created`): handled, and the key stored with its tasks.
    pub(super) fn create_once(
        &mut self,
        conn: ConnId,
        id: u64,
        key: u128,
        request: CreateRequest,
        check: DiskCheck,
    ) -> Handled {
        let how = |resume| Creating { resume, once: Some(key) };
        match request {
            CreateRequest::Tasks { identifier, tasks, resume } => {
                self.create_tasks(conn, id, identifier, tasks, how(resume), check)
            }
            CreateRequest::Uploads { identifier, uploads, resume } => {
                self.create_uploads(conn, id, identifier, uploads, how(resume), check)
            }
            CreateRequest::FromResumeData { identifier, resume_data, resume } => {
                self.create_from_resume_data(conn, id, identifier, resume_data, how(resume), check)
            }
        }
    }

    /// At most `max_tasks_per_batch` of them in one request.
    pub(super) fn within_batch_limit(&self, n: usize, what: &str) -> Result<(), ErrorInfo> {
        let max = self.cfg.limits.max_tasks_per_batch as usize;
        if n > max {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!("{n} {what} in one batch; the limit is {max}"),
            ));
        }
        Ok(())
    }

    /// Runs a request's disk phase on a blocking thread; the request comes back with
    /// its outcome (`CoreMsg::DiskChecked`). The connection's later requests wait for it.
    pub(in crate::core) fn check_on_disk(
        &mut self,
        conn: ConnId,
        id: u64,
        request: Request,
        paths: Vec<std::path::PathBuf>,
        check: impl FnOnce() -> Result<Prepared, ErrorInfo> + Send + 'static,
    ) {
        // While a check of this connection hangs, the next one on the same mount fails at
        // once: one connection ties up at most one check thread per hung mount.
        // (The mount table is read only then: not for every check.)
        let mounts = if self.held.stuck(conn) { disk::mounts_of(&paths) } else { Vec::new() };
        if let Some(mount) = self.held.stuck_on(conn, &mounts) {
            let error = ErrorInfo::new(
                ErrorCode::FileError,
                format!(
                    "an earlier check of files under {} for this connection still hangs (a hung mount?); try again later",
                    mount.display()
                ),
            );
            return self.reply(conn, id, Err(error));
        }
        let token = self.held.went_to_disk(conn, id, paths);
        let tx = self.tx.clone();
        disk::check_request(check, move |result| {
            let _ = tx.send(CoreMsg::DiskChecked { conn, token, request: Box::new(request), result });
        });
        let (tx, after) = (self.tx.clone(), self.cfg.timing.disk_check_timeout);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(CoreMsg::DiskCheckTimedOut { conn, token });
        });
        self.held.set_disk_timer(conn, token, timer.abort_handle());
    }
}
