//! The exit status of the commands that wait for a job (`kiln wait`, `kiln submit --wait`,
//! `kiln run`, `kiln events`): one code per way a job can end, from one table, so a script can
//! tell a failed job from a gateway it could not reach.

use std::process::ExitCode;

use kiln_proto::JobStatus;
use serde_json::Value;

/// The job succeeded (and every command that does not wait for a job, when it worked).
pub const EXIT_SUCCEEDED: u8 = 0;
/// The command itself failed: the gateway unreachable, an API error (`404 job_not_found`, `401`,
/// `422` …), a file that cannot be read or written.
pub const EXIT_ERROR: u8 = 1;
/// Bad usage: an unknown flag, a missing argument (clap's own code).
pub const EXIT_USAGE: u8 = 2;
/// The job failed (`error.code` says why). The same code as `kiln batch run` when lines failed.
pub const EXIT_FAILED: u8 = 3;
/// The job was canceled.
pub const EXIT_CANCELED: u8 = 4;
/// The job expired: its deadline passed before it started.
pub const EXIT_EXPIRED: u8 = 5;
/// The wait (`--timeout`, `--wait`) ran out while the job was still queued or running.
pub const EXIT_NOT_FINISHED: u8 = 6;

/// The table as `--help` shows it.
pub const EXIT_CODES_HELP: &str = "Exit status: 0 succeeded, 1 error (gateway unreachable, API error), 2 usage, \
3 job failed, 4 job canceled, 5 job expired, 6 still running when the wait ran out.";

/// Where a job stands, as far as the exit status goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Canceled,
    Expired,
    /// Queued or running: the wait ran out first.
    NotFinished,
}

impl Outcome {
    pub fn of_status(status: JobStatus) -> Self {
        match status {
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::Canceled => Self::Canceled,
            JobStatus::Expired => Self::Expired,
            JobStatus::Queued | JobStatus::Running => Self::NotFinished,
        }
    }

    /// The outcome of a job record; a record without a status this client knows is not finished.
    pub fn of(record: &Value) -> Self {
        serde_json::from_value::<JobStatus>(record["status"].clone()).map_or(Self::NotFinished, Self::of_status)
    }

    pub fn is_terminal(self) -> bool {
        self != Self::NotFinished
    }

    pub fn code(self) -> u8 {
        match self {
            Self::Succeeded => EXIT_SUCCEEDED,
            Self::Failed => EXIT_FAILED,
            Self::Canceled => EXIT_CANCELED,
            Self::Expired => EXIT_EXPIRED,
            Self::NotFinished => EXIT_NOT_FINISHED,
        }
    }

    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }

    /// One line for stderr when the job did not succeed; `None` when it did.
    pub fn complaint(self, record: &Value) -> Option<String> {
        let id = record["id"].as_str().unwrap_or("?");
        let error = || {
            let (code, message) = (record["error"]["code"].as_str(), record["error"]["message"].as_str());
            match (code, message) {
                (Some(c), Some(m)) => format!(": {c}: {m}"),
                (Some(c), None) => format!(": {c}"),
                _ => String::new(),
            }
        };
        match self {
            Self::Succeeded => None,
            Self::Failed => Some(format!("job {id} failed{}", error())),
            Self::Canceled => Some(format!("job {id} was canceled")),
            Self::Expired => Some(format!("job {id} expired before it started{}", error())),
            Self::NotFinished => {
                Some(format!("job {id} is still {} (the wait ran out)", record["status"].as_str().unwrap_or("unknown")))
            }
        }
    }
}
