//! Controlling tasks: resume, suspend, cancel (with or without resume data), and
//! acknowledging completed ones.

use std::collections::{BTreeMap, HashSet};

use tracing::info;

use super::{Answer, Handled, no_such_task};
use crate::conn::ConnId;
use crate::core::task::AfterStop;
use crate::core::transitions::cancelled;
use crate::core::{After, Core};
use crate::model::{SessionKey, now_ms};
use dlsession_proto::{ErrorCode, ErrorInfo, Response, TaskAction, TaskId, TaskState};

impl Core {
    /// Resumes many tasks in one commit (`ResumeTasks`), each as `control_task` resumes
    /// one; all or nothing.
    pub(super) fn resume_tasks(&mut self, conn: ConnId, id: u64, tasks: &[TaskId]) -> Handled {
        self.within_batch_limit(tasks.len(), "tasks")?;
        for &task in tasks {
            let t = self.tasks.get(&task).ok_or_else(|| no_such_task(task))?;
            if t.state == TaskState::Completed {
                // Maybe by a request whose commit is still on its way: refused once durable.
                let error = ErrorInfo::new(ErrorCode::InvalidRequest, format!("task {task} has already completed"));
                self.commit_after_pending(Vec::new(), vec![After::Refuse { conn, id, error }]);
                return Ok(Answer::Later);
            }
        }
        let now = now_ms();
        let mut ops = Vec::new();
        for &task in tasks {
            let Some(t) = self.tasks.get_mut(&task) else { continue };
            let pending_suspend = t.run.as_ref().is_some_and(|r| r.after_stop == Some(AfterStop::Suspend));
            match t.state {
                TaskState::Suspended => {
                    self.make_queued(task, now);
                    ops.extend(self.queued_op(task));
                }
                TaskState::Running if pending_suspend => {
                    if let Some(run) = t.run.as_mut() {
                        run.after_stop = Some(AfterStop::Requeue);
                    }
                }
                TaskState::Waiting => self.retry_now(task, false, Vec::new()),
                _ => {}
            }
        }
        info!(tasks = tasks.len(), "tasks resumed");
        // After whatever is on its way: a task resumed by an earlier request counts.
        self.commit_after_pending(ops, vec![After::Reply { conn, id, response: Response::Ok }]);
        self.schedule();
        Ok(Answer::Later)
    }

    pub(super) fn control_task(&mut self, conn: ConnId, id: u64, task: TaskId, action: TaskAction) -> Handled {
        let t = self.tasks.get_mut(&task).ok_or_else(|| no_such_task(task))?;
        let state = t.state;
        if state == TaskState::Completed {
            // Maybe by a request whose commit is still on its way: refused once it is durable.
            let error = ErrorInfo::new(ErrorCode::InvalidRequest, format!("task {task} has already completed"));
            self.commit_after_pending(Vec::new(), vec![After::Refuse { conn, id, error }]);
            return Ok(Answer::Later);
        }
        let stopping_for = t.run.as_ref().and_then(|r| r.after_stop);
        // The body is in and the file is being synced and moved: too late to stop it.
        let finishing = t.run.as_ref().is_some_and(|r| !r.holds_slot);
        if finishing && action != TaskAction::Resume {
            return Err(ErrorInfo::new(
                ErrorCode::InvalidRequest,
                format!("task {task} has received all its data and is finishing; it can no longer be stopped"),
            ));
        }
        let ok = || vec![After::Reply { conn, id, response: Response::Ok }];
        match action {
            TaskAction::Resume => match state {
                TaskState::Suspended => {
                    self.make_queued(task, now_ms());
                    let ops = self.queued_op(task).into_iter().collect();
                    self.commit(ops, ok());
                    self.schedule();
                    Ok(Answer::Later)
                }
                TaskState::Running if stopping_for == Some(AfterStop::Suspend) => {
                    if let Some(run) = t.run.as_mut() {
                        run.after_stop = Some(AfterStop::Requeue);
                    }
                    Ok(Answer::Now(Response::Ok))
                }
                // Backing off (or waiting to move its file): try now. The backoff itself is
                // kept: a resume is a nudge, not a promise that the problem is gone.
                TaskState::Waiting => {
                    info!(task, "resumed while waiting: retrying now");
                    self.retry_now(task, false, ok());
                    self.schedule();
                    Ok(Answer::Later)
                }
                // Queued or running already, maybe by a request whose commit is still on its
                // way: answered once that is durable.
                _ => {
                    self.commit_after_pending(Vec::new(), ok());
                    Ok(Answer::Later)
                }
            },
            TaskAction::Suspend => match state {
                // Suspended already, maybe by a request whose commit is still on its way:
                // answered once that is durable.
                TaskState::Suspended => {
                    self.commit_after_pending(Vec::new(), ok());
                    Ok(Answer::Later)
                }
                TaskState::Running => {
                    t.waiting_replies.push((conn, id, action));
                    self.stop_worker(task, AfterStop::Suspend);
                    Ok(Answer::Later)
                }
                _ => {
                    self.unqueue(task);
                    // A challenge it waited on is no longer waited on: resumed, it asks again.
                    let withdrawn = self.drop_challenge(task);
                    if !withdrawn.is_empty() {
                        self.commit(withdrawn, Vec::new());
                    }
                    self.set_state(task, TaskState::Suspended);
                    self.save_task(task, ok());
                    Ok(Answer::Later)
                }
            },
            TaskAction::Cancel | TaskAction::CancelProducingResumeData => {
                let with_data = action == TaskAction::CancelProducingResumeData;
                if with_data && t.rec.upload.is_some() {
                    return Err(ErrorInfo::new(
                        ErrorCode::InvalidRequest,
                        format!("task {task} is an upload: resume data is for downloads (cancel it instead)"),
                    ));
                }
                let by = self.conns.describe(conn);
                if state == TaskState::Running {
                    t.waiting_replies.push((conn, id, action));
                    t.cancelled_by = Some(by);
                    let how = if with_data { AfterStop::CancelProducingResumeData } else { AfterStop::Cancel };
                    self.stop_worker(task, how);
                    return Ok(Answer::Later);
                }
                self.unqueue(task);
                let mut ops = Vec::new();
                let mut after = Vec::new();
                let reply = if with_data {
                    let blob = self.keep_for_resume(task, &mut after);
                    After::ReplyAfterDisk { conn, id, response: Response::ResumeData(blob) }
                } else {
                    After::Reply { conn, id, response: Response::Ok }
                };
                self.complete(task, Some(cancelled(&by)), &mut ops, &mut after);
                after.push(reply);
                self.commit(ops, after);
                Ok(Answer::Later)
            }
        }
    }

    pub(super) fn acknowledge_tasks(&mut self, conn: ConnId, id: u64, tasks: Vec<TaskId>) -> Handled {
        // The tasks per session first, then one pass over each session's events: a pass per
        // task made acknowledging 1,000 tasks cost 1,000 passes over 2,000 events.
        let mut wanted: BTreeMap<SessionKey, HashSet<TaskId>> = BTreeMap::new();
        for task in tasks {
            let t = self.tasks.get(&task).ok_or_else(|| no_such_task(task))?;
            if t.state != TaskState::Completed {
                return Err(ErrorInfo::new(ErrorCode::InvalidRequest, format!("task {task} has not completed")));
            }
            wanted.entry(t.rec.session).or_default().insert(task);
        }
        let mut by_session: BTreeMap<SessionKey, Vec<u64>> = BTreeMap::new();
        for (key, ids) in wanted {
            let Some(s) = self.sessions.get(&key) else { continue };
            let mut seqs: Vec<u64> = ids.iter().flat_map(|&t| s.pending_of(t).map(|(seq, _)| seq)).collect();
            seqs.sort_unstable();
            by_session.insert(key, seqs);
        }
        let last = by_session.len();
        if last == 0 {
            return Ok(Answer::Now(Response::Ok));
        }
        for (i, (key, seqs)) in by_session.into_iter().enumerate() {
            if i + 1 == last {
                self.acknowledge(conn, id, key, seqs);
            } else {
                self.acknowledge_quietly(key, seqs);
            }
        }
        Ok(Answer::Later)
    }
}
