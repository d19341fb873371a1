//! Requests of any size: task batches, acknowledgements and listings split into requests
//! that each stay well under the frame limit.

use dlsession_proto::{Request, Response, SessionInfo, SessionQuery, TaskAction, TaskId, TaskPolicy, TaskSpec};
use tracing::warn;

use crate::connection::Client;
use crate::error::{Error, Result};

impl Client {
    /// Creates tasks in as many requests as it takes to keep each well under the frame
    /// limit (each request is one transaction); returns the ids in order. All or nothing:
    /// if a later request is refused, the tasks the earlier ones created are cancelled
    /// and retired again before the error is returned.
    pub async fn create_tasks(&self, identifier: &str, specs: Vec<TaskSpec>, resume: bool) -> Result<Vec<TaskId>> {
        let mut ids = Vec::with_capacity(specs.len());
        match self.create_in_batches(identifier, specs, resume, &mut ids).await {
            Ok(()) => Ok(ids),
            Err(e) => {
                if !ids.is_empty() {
                    warn!(created = ids.len(), error = %e, "a batch was refused; cancelling the tasks created before it");
                    for &task in &ids {
                        let _ = self.request(Request::ControlTask { task, action: TaskAction::Cancel }).await;
                    }
                    let _ = self.acknowledge_tasks(&ids).await;
                }
                Err(e)
            }
        }
    }

    async fn create_in_batches(
        &self,
        identifier: &str,
        specs: Vec<TaskSpec>,
        resume: bool,
        ids: &mut Vec<TaskId>,
    ) -> Result<()> {
        let mut specs = specs.into_iter().peekable();
        while specs.peek().is_some() {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(spec) = specs
                .next_if(|s| batch.is_empty() || (batch.len() < BATCH_TASKS && bytes + spec_size(s) <= BATCH_BYTES))
            {
                bytes += spec_size(&spec);
                batch.push(spec);
            }
            let want = batch.len();
            match self.request(Request::CreateTasks { identifier: identifier.to_owned(), tasks: batch, resume }).await?
            {
                Response::TasksCreated(got) if got.len() == want => ids.extend(got),
                other => return Err(Error::UnexpectedResponse { expected: "tasks_created", got: other.kind() }),
            }
        }
        Ok(())
    }

    /// Acknowledges every durable event of these completed tasks, in requests of a
    /// bounded size.
    pub async fn acknowledge_tasks(&self, tasks: &[TaskId]) -> Result<()> {
        for chunk in tasks.chunks(BATCH_IDS) {
            match self.request(Request::AcknowledgeTasks { tasks: chunk.to_vec() }).await? {
                Response::Ok => {}
                other => return Err(Error::UnexpectedResponse { expected: "ok", got: other.kind() }),
            }
        }
        Ok(())
    }

    /// Gives these tasks their own policy (each field set overrides their session's), in
    /// requests of a bounded size. Each request is all or nothing.
    pub async fn set_task_policy(&self, tasks: &[TaskId], policy: TaskPolicy) -> Result<()> {
        for chunk in tasks.chunks(BATCH_IDS) {
            match self.request(Request::SetTaskPolicy { tasks: chunk.to_vec(), policy }).await? {
                Response::Ok => {}
                other => return Err(Error::UnexpectedResponse { expected: "ok", got: other.kind() }),
            }
        }
        Ok(())
    }

    /// Every session, in identifier order, fetched a page at a time.
    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let query = SessionQuery { after: after.clone(), limit: 1000 };
            let page = match self.request(Request::ListSessionsPage(query)).await? {
                Response::SessionsPage(page) => page,
                other => return Err(Error::UnexpectedResponse { expected: "sessions_page", got: other.kind() }),
            };
            all.extend(page.sessions);
            match page.next_after {
                // A cursor that does not advance would loop for ever.
                Some(next) if after.as_ref().is_none_or(|prev| next > *prev) => after = Some(next),
                _ => return Ok(all),
            }
        }
    }
}

/// Tasks per `CreateTasks` request, and the bytes of specs (well under the frame limit).
const BATCH_TASKS: usize = 1000;
const BATCH_BYTES: usize = 512 << 10;
/// Task ids per acknowledgement request.
const BATCH_IDS: usize = 10_000;

/// About how many bytes a task spec takes on the wire (an upper estimate).
fn spec_size(s: &TaskSpec) -> usize {
    let headers: usize = s.headers.iter().map(|h| h.name.len() + h.value.len() + 4).sum();
    64 + s.url.len()
        + headers
        + s.description.as_ref().map_or(0, String::len)
        + s.destination.as_ref().map_or(0, String::len)
}
