//! `dlsessionctl pause|resume|cancel TASK`

use std::io::Write;

use dlsession_proto::{Request, TaskAction, TaskId};

use crate::commands::ctx::{Ctx, request_ok};
use crate::error::{Exit, Result};
use crate::json::{self, ControlJson};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Cancel,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Cancel => "cancel",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Action::Pause => "paused",
            Action::Resume => "resumed",
            Action::Cancel => "cancelled",
        }
    }

    fn wire(self) -> TaskAction {
        match self {
            Action::Pause => TaskAction::Suspend,
            Action::Resume => TaskAction::Resume,
            Action::Cancel => TaskAction::Cancel,
        }
    }
}

pub async fn run(ctx: &Ctx, task: TaskId, action: Action) -> Result<Exit> {
    let client = ctx.connect().await?;
    request_ok(&client, Request::ControlTask { task, action: action.wire() }).await?;
    if ctx.json {
        json::print(&ControlJson { task, action: action.name(), ok: true })?;
    } else {
        writeln!(std::io::stdout().lock(), "task {task} {}", action.done())?;
    }
    Ok(Exit::Success)
}
